package org.apache.spark.scheduler.cluster.stoker

import java.io.{ByteArrayInputStream, DataInputStream}
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Path, Paths}
import java.util.zip.ZipFile

import scala.jdk.CollectionConverters._

import com.fasterxml.jackson.databind.{JsonNode, ObjectMapper}
import org.junit.jupiter.api.{AfterEach, BeforeEach, Test}

import org.apache.spark.{SecurityManager, SparkConf}
import org.apache.spark.deploy.k8s.{Config => K8sConfig, Constants}
import org.apache.spark.internal.config.ConfigEntry
import org.apache.spark.resource.ResourceProfile
import org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBuilder

/**
 * Every spark.kubernetes.* key of the Spark the plugin is built against has a row in
 * [[KeyCoverage]], and each row is proven: a key said to be honoured changes the executor pod
 * built through the plugin's real path (StokerSparkPods, offline), a key said not to concern
 * executor pods does not change it whatever its value, a key stoker does not honour is named by
 * the plugin's warning, a key stoker honours itself is read by stoker's code. The README key
 * table (docs/spark-kubernetes-keys.md) is what [[KeyCoverage.markdown]] generates.
 */
class KeyCoverageTest extends Checks {
  import KeyCoverage._

  private val mapper = new ObjectMapper()
  private val AppId = "spark-0123456789abcdef"
  private var dir: Path = _
  private var templateFile: Path = _

  /** The repository root (Maven runs the tests in spark-plugin/). */
  private val repo: Path = Paths.get(System.getProperty("user.dir")).toAbsolutePath.getParent

  private val Template =
    """apiVersion: v1
      |kind: Pod
      |metadata:
      |  labels:
      |    from-template: "yes"
      |spec:
      |  tolerations:
      |    - key: dedicated
      |      operator: Equal
      |      value: spark
      |      effect: NoSchedule
      |  containers:
      |    - name: log-shipper
      |      image: fluent/fluent-bit:3.1
      |    - name: spark-executor
      |      env:
      |        - name: FROM_TEMPLATE
      |          value: "1"
      |""".stripMargin

  @BeforeEach def setUp(): Unit = {
    dir = Files.createTempDirectory("stoker-keys")
    templateFile = dir.resolve("template.yaml")
    Files.write(templateFile, Template.getBytes(StandardCharsets.UTF_8))
    ResourceProfile.clearDefaultProfile()
  }

  @AfterEach def tearDown(): Unit = {
    ResourceProfile.clearDefaultProfile()
    Files.walk(dir).iterator().asScala.toSeq.reverse.foreach(p => Files.deleteIfExists(p))
  }

  // ---- What Spark defines. --------------------------------------------------------------------

  private def configObject: AnyRef = K8sConfig

  /** The ConfigEntry fields of org.apache.spark.deploy.k8s.Config. */
  private def configEntries: Seq[ConfigEntry[_]] =
    configObject.getClass.getDeclaredFields.toSeq
      .filter(f => classOf[ConfigEntry[_]].isAssignableFrom(f.getType))
      .map { f => f.setAccessible(true); f.get(configObject).asInstanceOf[ConfigEntry[_]] }

  /** The String constants of Config (prefixes, volume types and options, auth suffixes...). */
  private def configConstants: Map[String, String] =
    configObject.getClass.getDeclaredFields.toSeq
      .filter(_.getType == classOf[String])
      .map { f => f.setAccessible(true); f.getName -> f.get(configObject).asInstanceOf[String] }
      .toMap

  /** spark.kubernetes.* keys among the String constants of org.apache.spark.deploy.k8s.Constants. */
  private def constantsKeys: Seq[String] = {
    val o: AnyRef = Constants
    o.getClass.getDeclaredFields.toSeq.filter(_.getType == classOf[String])
      .map { f => f.setAccessible(true); f.get(o).asInstanceOf[String] }
      .filter(_.startsWith("spark.kubernetes."))
  }

  /** spark.kubernetes.* entries registered with Spark (core's and the Kubernetes module's). */
  private def registeredKeys: Seq[String] = {
    org.apache.spark.internal.config.EXECUTOR_CORES.key // loads core's entries
    configEntries.size // and the Kubernetes module's
    ConfigEntry.knownConfigs.keySet().asScala.toSeq.filter(_.startsWith("spark.kubernetes."))
  }

  /** Every `spark.kubernetes.` string constant in the class files of a jar. */
  private def literalsIn(jar: Path): Set[String] = {
    val zip = new ZipFile(jar.toFile)
    try {
      zip.entries().asScala.filter(_.getName.endsWith(".class")).flatMap { e =>
        val in = zip.getInputStream(e)
        val bytes = try in.readAllBytes() finally in.close()
        utf8Constants(bytes).flatMap(s =>
          "spark\\.kubernetes\\.[A-Za-z0-9_.\\-]*".r.findAllIn(s).toSeq)
      }.toSet
    } finally zip.close()
  }

  /** The CONSTANT_Utf8 entries of a class file's constant pool. */
  private def utf8Constants(bytes: Array[Byte]): Seq[String] = {
    val in = new DataInputStream(new ByteArrayInputStream(bytes))
    in.readInt(); in.readUnsignedShort(); in.readUnsignedShort()
    val count = in.readUnsignedShort()
    val out = Seq.newBuilder[String]
    var i = 1
    while (i < count) {
      in.readUnsignedByte() match {
        case 1 => out += in.readUTF()
        case 3 | 4 => in.skipBytes(4)
        case 5 | 6 => in.skipBytes(8); i += 1
        case 7 | 8 | 16 | 19 | 20 => in.skipBytes(2)
        case 9 | 10 | 11 | 12 | 17 | 18 => in.skipBytes(4)
        case 15 => in.skipBytes(3)
        case t => throw new IllegalStateException(s"constant pool tag $t")
      }
      i += 1
    }
    out.result()
  }

  private def jarOf(c: Class[_]): Path =
    Paths.get(c.getProtectionDomain.getCodeSource.getLocation.toURI)

  private lazy val literals: Set[String] =
    literalsIn(jarOf(classOf[KubernetesExecutorBuilder])) ++ literalsIn(jarOf(classOf[SparkConf]))

  /** Config's String constants that are not keys or key prefixes, and where they are covered. */
  private val Fragments: Map[String, String] = Map(
    "OAUTH_TOKEN_CONF_SUFFIX" -> "authenticate.[name]",
    "OAUTH_TOKEN_FILE_CONF_SUFFIX" -> "authenticate.[name]",
    "CLIENT_KEY_FILE_CONF_SUFFIX" -> "authenticate.[name]",
    "CLIENT_CERT_FILE_CONF_SUFFIX" -> "authenticate.[name]",
    "CA_CERT_FILE_CONF_SUFFIX" -> "authenticate.[name]",
    "dns1123LabelFmt" -> "not a key (a pattern for pod name prefixes)")

  private val VolumeFragments = Set("KUBERNETES_VOLUMES_HOSTPATH_TYPE", "KUBERNETES_VOLUMES_PVC_TYPE",
    "KUBERNETES_VOLUMES_EMPTYDIR_TYPE", "KUBERNETES_VOLUMES_NFS_TYPE")

  private val ExtraPrefixes = Seq("spark.executorEnv.")

  // ---- Building pods through the plugin's real path. ------------------------------------------

  private def base(): SparkConf = new SparkConf(false)
    .set("spark.app.name", "coverage")
    .set("spark.app.id", AppId)
    .set("spark.driver.host", "10.0.0.5")
    .set("spark.driver.port", "7078")
    .set("spark.kubernetes.container.image", "apache/spark:4.2.0")
    .set("spark.kubernetes.executor.podNamePrefix", "cov")
    // Without it Spark's LocalDirsFeatureStep draws a random directory for every pod it builds,
    // and any two pods would differ.
    .set("spark.local.dir", "/tmp/spark-local")

  private def conf(settings: Seq[(String, String)]): SparkConf = {
    val c = base()
    settings.foreach { case (k, v) => c.set(k, v.replace("@TEMPLATE@", templateFile.toString)) }
    c
  }

  /** What the driver sends for the default profile: pod, claims, ConfigMap (or the error). */
  private case class Built(pod: String, resources: Seq[String], configMaps: Seq[String],
      error: String)

  private def build(settings: Seq[(String, String)]): Built = {
    val c = conf(settings)
    ResourceProfile.clearDefaultProfile()
    val rp = ResourceProfile.getOrCreateDefaultProfile(c)
    val app = StokerSparkPods.appLevel(c, AppId).build()
    val p = StokerSparkPods.profilePod(c, AppId, rp, new SecurityManager(c))
    Built(p.getPodJson, p.getResourcesJsonList.asScala.toSeq,
      app.getAppResourcesJsonList.asScala.toSeq.map(withoutProperties), p.getError)
  }

  /**
   * The executor ConfigMap without its spark.properties, which carries the driver's whole conf
   * (as under Spark's own backend), so that every key would "change" it.
   */
  private def withoutProperties(configMap: String): String = {
    val node = json(configMap)
    node.path("data") match {
      case data: com.fasterxml.jackson.databind.node.ObjectNode => data.remove("spark.properties")
      case _ =>
    }
    mapper.writeValueAsString(node)
  }

  /** A concrete key for a row's pattern. */
  private def concrete(key: String): String =
    key.replace("[type]", "hostPath").replace("[name]", "x").replace("[option]", "mount.path")

  private def json(s: String): JsonNode = mapper.readTree(s)

  private def diff(a: JsonNode, b: JsonNode, path: String = ""): Seq[String] = {
    if (a.isObject && b.isObject) {
      val keys = (a.fieldNames().asScala ++ b.fieldNames().asScala).toSeq.distinct.sorted
      keys.flatMap(k => diff(a.path(k), b.path(k), s"$path/$k"))
    } else if (a.isArray && b.isArray && a.size == b.size) {
      (0 until a.size).flatMap(i => diff(a.get(i), b.get(i), s"$path/$i"))
    } else if (a == b) Nil else Seq(path)
  }

  /**
   * The paths that differ between the pods (and claims) of executors 7 and 1234 and that stoker
   * does not fill in per executor (crates/stoker-k8s/src/spark_pod.rs): must be none.
   */
  private def unfilledPerExecutorParts(settings: Seq[(String, String)]): Seq[String] = {
    val c = conf(settings)
    ResourceProfile.clearDefaultProfile()
    val rp = ResourceProfile.getOrCreateDefaultProfile(c)
    def one(id: String) =
      StokerExecutorPods.build(c, AppId, rp, new SecurityManager(c), executorId = id)
    val (a, b) = (one("7"), one("1234"))
    val podA = json(a.podJson)
    val sc = podA.path("spec").path("containers").size - 1
    val env = podA.path("spec").path("containers").get(sc).path("env")
    def envName(i: String) = env.path(i.toInt).path("name").asText()
    // What stoker fills in per executor (crates/stoker-k8s/src/spark_pod.rs `executor`): the
    // placeholder id in every label and annotation value among them.
    val filled = Seq(
      "^/metadata/name$", "^/metadata/labels/[^/]+$", "^/metadata/annotations/[^/]+$",
      "^/spec/hostname$", "^/spec/volumes/\\d+/persistentVolumeClaim/claimName$")
    val envValue = s"^/spec/containers/$sc/env/(\\d+)/value$$".r
    val podPaths = diff(podA, json(b.podJson)).filterNot { p =>
      filled.exists(p.matches) || (p match {
        case envValue(i) => envName(i) == "SPARK_EXECUTOR_ID" || envName(i).startsWith("SPARK_JAVA_OPT_")
        case _ => false
      })
    }
    val claimPaths = a.resourcesJson.zip(b.resourcesJson).flatMap { case (x, y) =>
      diff(json(x), json(y)).filterNot(_ == "/metadata/name")
    }
    podPaths ++ claimPaths
  }

  /** What differs between two builds (for messages). */
  private def changes(a: Built, b: Built): Seq[String] = {
    def all(x: Built) = Seq("pod" -> x.pod) ++ x.resources.zipWithIndex.map { case (r, i) =>
      s"claim $i" -> r } ++ x.configMaps.zipWithIndex.map { case (c, i) => s"configMap $i" -> c }
    val (xa, xb) = (all(a).toMap, all(b).toMap)
    (xa.keySet ++ xb.keySet).toSeq.sorted.flatMap { k =>
      (xa.get(k), xb.get(k)) match {
        case (Some(p), Some(q)) => diff(json(p), json(q)).map(d => s"$k $d")
        case (p, _) => Seq(s"$k ${if (p.isEmpty) "added" else "removed"}")
      }
    } ++ (if (a.error != b.error) Seq(s"error '${a.error}' / '${b.error}'") else Nil)
  }

  // ---- Enumeration. ---------------------------------------------------------------------------

  @Test def theRowsAreCheckedAgainstTheSparkOnTheClassPath(): Unit = {
    eq(SparkVersion, org.apache.spark.SPARK_VERSION, "KeyCoverage.SparkVersion")
  }

  @Test def everyConfigEntryOfSparksKubernetesConfigHasItsOwnRow(): Unit = {
    val entries = configEntries
    check(entries.size > 80, s"only ${entries.size} ConfigEntry fields found in Config")
    val keys = (entries.map(_.key) ++ entries.flatMap(_.alternatives)).distinct
    val missing = keys.filterNot(k => rows.exists(r => !r.isPattern && r.key == k)).sorted
    check(missing.isEmpty, s"keys of Spark ${org.apache.spark.SPARK_VERSION}'s Config without a " +
      s"row in KeyCoverage (classify them):\n  ${missing.mkString("\n  ")}")
    System.err.println(s"[keys] ${entries.size} ConfigEntry fields in Config")
  }

  @Test def everyConstantOfConfigIsAKeyPrefixWithRowsOrAKnownFragment(): Unit = {
    val constants = configConstants
    check(constants.size > 30, s"only ${constants.size} String constants found in Config")
    val problems = constants.toSeq.sorted.flatMap { case (name, value) =>
      if (value.startsWith("spark.")) {
        if (rows.exists(_.key.startsWith(value))) None
        else Some(s"$name = $value: a key prefix without rows")
      } else if (VolumeFragments(name)) {
        if (rows.exists(_.key.startsWith(s"spark.kubernetes.executor.volumes.$value.[name]."))) None
        else Some(s"$name = $value: a volume type without rows")
      } else if (name.startsWith("KUBERNETES_VOLUMES_")) {
        if (rows.exists(r => r.key.startsWith("spark.kubernetes.executor.volumes.") &&
          r.key.contains(s".[name].$value"))) None
        else Some(s"$name = $value: a volume option without rows")
      } else if (Fragments.contains(name)) {
        val where = Fragments(name)
        if (where.startsWith("not a key") || rows.exists(_.key == s"spark.kubernetes.$where")) None
        else Some(s"$name = $value: its row $where is missing")
      } else Some(s"$name = $value: a new constant of Config (classify it)")
    }
    check(problems.isEmpty, problems.mkString("\n"))
  }

  @Test def everyRegisteredKeyConstantAndLiteralHasARow(): Unit = {
    val keys = (registeredKeys ++ constantsKeys).distinct
    val missing = keys.filter(rowFor(_).isEmpty) ++
      literals.toSeq.filter(l => rowFor(l).isEmpty && !rows.exists(_.key.startsWith(l)))
    check(missing.isEmpty, s"spark.kubernetes keys Spark ${org.apache.spark.SPARK_VERSION} " +
      s"registers or names without a row in KeyCoverage:\n  ${missing.distinct.sorted.mkString("\n  ")}")
    System.err.println(s"[keys] ${keys.size} registered/Constants keys, ${literals.size} literals")
  }

  @Test def everyRowIsAKeySparkKnows(): Unit = {
    val known = (configEntries.map(_.key) ++ registeredKeys ++ constantsKeys ++ literals).toSet
    val prefixes = configConstants.values.filter(_.startsWith("spark.")).toSeq ++ ExtraPrefixes
    val stale = rows.filterNot { r =>
      if (r.isPattern) prefixes.exists(p => r.prefix.startsWith(p)) else known(r.key)
    }
    check(stale.isEmpty, s"rows for keys Spark does not define: ${stale.map(_.key)}")
    val duplicates = rows.groupBy(_.key).collect { case (k, rs) if rs.size > 1 => k }
    check(duplicates.isEmpty, s"keys with two rows: $duplicates")
  }

  @Test def everyRowHasAProofThatFitsItsStatus(): Unit = {
    val wrong = rows.filterNot { r =>
      (r.status, r.proof) match {
        case (Honoured, _: PodDiffers | _: Unobservable) => true
        case (ByStoker, _: StokerReads) => true
        case (Refused, _: Warned) => true
        case (Replaced | DriverOnly, PodUnchanged | _: Unobservable) => true
        case _ => false
      }
    }
    check(wrong.isEmpty, s"rows whose proof does not fit the status: ${wrong.map(_.key)}")
    check(rows.forall(_.why.trim.nonEmpty), "every row says how or why")
    val counts = Statuses.map(s => s"${s.name}: ${rowsOf(s).size}").mkString(", ")
    System.err.println(s"[keys] ${rows.size} rows ($counts)")
  }

  // ---- Proofs. --------------------------------------------------------------------------------

  /** Without this, comparing pods would prove nothing. */
  @Test def theSamePodIsBuiltTwiceAlike(): Unit = {
    val a = build(Nil)
    eq("", a.error)
    check(a.pod.contains("apache/spark:4.2.0"), a.pod)
    eq(a, build(Nil), "two builds of the same configuration")
    val local = base().remove("spark.local.dir")
    ResourceProfile.clearDefaultProfile()
    val rp = ResourceProfile.getOrCreateDefaultProfile(local)
    def once() = StokerSparkPods.profilePod(local, AppId, rp, new SecurityManager(local)).getPodJson
    check(once() != once(), "without spark.local.dir Spark draws a random local dir (the test " +
      "pins spark.local.dir for that reason)")
  }

  @Test def honouredKeysChangeTheExecutorPod(): Unit = {
    val failures = rows.collect { case r @ Row(_, Honoured, _, PodDiffers(set, context), _) =>
      val without = build(context)
      val withKey = build(context ++ set)
      if (without.error.nonEmpty) Some(s"${r.key}: the pod without it fails: ${without.error}")
      else if (withKey.error.nonEmpty) Some(s"${r.key}: the pod with it fails: ${withKey.error}")
      else if (without == withKey) Some(s"${r.key}: the pod does not change with $set")
      else None
    }.flatten
    check(failures.isEmpty, failures.mkString("\n"))
  }

  @Test def honouredKeysNeedNothingStokerDoesNotFillInPerExecutor(): Unit = {
    val failures = rows.collect { case r @ Row(_, Honoured, _, PodDiffers(set, context), _) =>
      val unfilled = unfilledPerExecutorParts(context ++ set)
      if (unfilled.isEmpty) None else Some(s"${r.key}: $unfilled differ between executors")
    }.flatten
    check(failures.isEmpty, failures.mkString("\n"))
  }

  /**
   * Spark substitutes {{APP_ID}} and {{EXECUTOR_ID}} in more places than the Java options: where
   * stoker does not fill the id in per executor, the plugin warns naming the key.
   */
  @Test def placeholdersAreFilledInPerExecutorOrWarnedAbout(): Unit = {
    val e = "spark.kubernetes.executor."
    val failures = Seq(
      e + "label.exec" -> "x-{{EXECUTOR_ID}}",
      e + "annotation.exec" -> "x-{{EXECUTOR_ID}}",
      "spark.executor.extraJavaOptions" -> "-Dexec={{EXECUTOR_ID}} -Dapp={{APP_ID}}",
      "spark.executorEnv.EXEC" -> "x-{{EXECUTOR_ID}}"
    ).flatMap { case (k, v) =>
      val unfilled = unfilledPerExecutorParts(Seq(k -> v))
      val warned = StokerSparkPods.appLevel(conf(Seq(k -> v)), AppId).build()
        .getUnsupportedKeysMap.containsKey(k)
      if (unfilled.isEmpty || warned) None
      else Some(s"$k=$v: $unfilled differ between executors, and the plugin does not warn")
    }
    check(failures.isEmpty, failures.mkString("\n"))
  }

  @Test def keysThatDoNotConcernExecutorPodsLeaveThePodAlone(): Unit = {
    val baseline = build(Nil)
    val values = Seq("true", "false", "7", "7s", "0.5", "sample-value", "registry.example/x:1",
      "java")
    val failures = rows.filter(_.proof == PodUnchanged).flatMap { r =>
      val key = concrete(r.key)
      val built = values.map(v => v -> build(Seq(key -> v))).filter(_._2.error.isEmpty)
      if (built.isEmpty) Some(s"${r.key}: no sample value builds a pod")
      else built.collect { case (v, b) if b != baseline =>
        s"${r.key}=$v changes the pod: ${changes(baseline, b).mkString(", ")}"
      }
    }
    check(failures.isEmpty, failures.mkString("\n"))
  }

  @Test def keysStokerDoesNotHonourAreNamedInTheRegistration(): Unit = {
    check(StokerSparkPods.appLevel(base(), AppId).build().getUnsupportedKeysMap.isEmpty,
      "nothing is warned about without such keys")
    val failures = rows.collect { case r @ Row(key, Refused, why, Warned(set), _) =>
      val sent = StokerSparkPods.appLevel(conf(set), AppId).build().getUnsupportedKeysMap.asScala
      if (sent.get(key).contains(why)) None else Some(s"$key with $set: sent $sent")
    }.flatten
    check(failures.isEmpty, failures.mkString("\n"))
  }

  @Test def reusingClaimsAndWaitingForOneAreHonouredNotWarnedAbout(): Unit = {
    val reuse = "spark.kubernetes.driver.reusePersistentVolumeClaim"
    val waitToReuse = "spark.kubernetes.driver.waitToReusePersistentVolumeClaim"
    val v = "spark.kubernetes.executor.volumes.persistentVolumeClaim.data."
    val onDemand = Seq(v + "mount.path" -> "/data", v + "options.claimName" -> "OnDemand")
    def warned(s: Seq[(String, String)]) = KeyCoverage.unsupportedKeys(conf(s)).keySet
    eq(Set.empty[String], warned(onDemand :+ (reuse -> "true")).toSet, "stoker reuses claims")
    eq(Set.empty[String], warned(onDemand), "Spark's default (reuse) is stoker's too")
    eq(Set.empty[String], warned(onDemand :+ (waitToReuse -> "true")).toSet,
      "stoker waits for a claim too")
  }

  @Test def keysStokerHonoursItselfAreReadByStokersCode(): Unit = {
    val failures = rows.collect { case r @ Row(key, ByStoker, _, StokerReads(file, literal), _) =>
      val path = repo.resolve(file)
      if (!Files.exists(path)) Some(s"$key: $file does not exist")
      else if (!new String(Files.readAllBytes(path), StandardCharsets.UTF_8).contains(literal)) {
        Some(s"$key: $file does not contain '$literal'")
      } else None
    }.flatten
    check(failures.isEmpty, failures.mkString("\n"))
  }

  // ---- The README table. ----------------------------------------------------------------------

  @Test def theCommittedKeyTableIsTheGeneratedOne(): Unit = {
    val file = repo.resolve("docs/spark-kubernetes-keys.md")
    val generated = KeyCoverage.markdown
    if (java.lang.Boolean.getBoolean("stoker.writeKeyTable")) {
      Files.createDirectories(file.getParent)
      Files.write(file, generated.getBytes(StandardCharsets.UTF_8))
    }
    check(Files.exists(file), s"$file is missing: run with -Dstoker.writeKeyTable=true")
    val committed = new String(Files.readAllBytes(file), StandardCharsets.UTF_8)
    check(committed == generated, s"$file differs from what KeyCoverage generates: " +
      "regenerate it (mvn -B -q test -Dtest=KeyCoverageTest -Dstoker.writeKeyTable=true)")
  }
}
