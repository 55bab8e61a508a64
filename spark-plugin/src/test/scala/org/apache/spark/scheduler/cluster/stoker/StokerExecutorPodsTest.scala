package org.apache.spark.scheduler.cluster.stoker

import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Path}

import scala.jdk.CollectionConverters._

import com.fasterxml.jackson.databind.{JsonNode, ObjectMapper}
import org.junit.jupiter.api.{AfterEach, BeforeEach, Test}

import org.apache.spark.{SecurityManager, SparkConf, SparkException}
import org.apache.spark.resource.{ExecutorResourceRequests, ResourceProfile, ResourceProfileBuilder}

/**
 * Spark's own KubernetesExecutorBuilder builds the executor pod in the driver, offline: the pod
 * stoker receives, and exactly which of its fields stoker fills in per executor.
 */
class StokerExecutorPodsTest extends Checks {

  private val mapper = new ObjectMapper()
  private val AppId = "spark-0123456789abcdef"
  private val Prefix = "etl-nightly-7f3a"
  private var dir: Path = _

  @BeforeEach def setUp(): Unit = {
    dir = Files.createTempDirectory("stoker-pods")
    ResourceProfile.clearDefaultProfile()
  }

  @AfterEach def tearDown(): Unit = {
    ResourceProfile.clearDefaultProfile()
    Files.walk(dir).iterator().asScala.toSeq.reverse.foreach(p => Files.deleteIfExists(p))
  }

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
      |      volumeMounts:
      |        - name: logs
      |          mountPath: /var/log/spark
      |    - name: spark-executor
      |      env:
      |        - name: FROM_TEMPLATE
      |          value: "1"
      |""".stripMargin

  /** A realistic executor configuration: most of the keys Spark's Kubernetes backend honours. */
  private def realisticConf(): SparkConf = {
    val template = dir.resolve("executor-template.yaml")
    Files.write(template, Template.getBytes(StandardCharsets.UTF_8))
    val v = "spark.kubernetes.executor.volumes."
    new SparkConf(false)
      .set("spark.app.name", "ETL nightly")
      .set("spark.app.id", AppId)
      .set("spark.driver.host", "10.0.0.5")
      .set("spark.driver.port", "7078")
      .set("spark.kubernetes.namespace", "team-a")
      .set("spark.kubernetes.container.image", "apache/spark:4.2.0")
      .set("spark.kubernetes.container.image.pullPolicy", "IfNotPresent")
      .set("spark.kubernetes.executor.podNamePrefix", Prefix)
      .set("spark.executor.cores", "4")
      .set("spark.executor.memory", "6g")
      .set("spark.kubernetes.executor.request.cores", "3500m")
      .set("spark.kubernetes.executor.limit.cores", "4")
      .set("spark.executor.extraJavaOptions",
        "-XX:+UseG1GC -Dapp.id={{APP_ID}} -Dexec.id={{EXECUTOR_ID}} " +
          "-Xlog:gc:file=/var/log/spark/gc-{{EXECUTOR_ID}}.log")
      .set("spark.decommission.enabled", "true")
      .set("spark.kubernetes.executor.podTemplateFile", template.toString)
      .set("spark.kubernetes.executor.podTemplateContainerName", "spark-executor")
      .set("spark.kubernetes.node.selector.disktype", "ssd")
      .set("spark.kubernetes.executor.node.selector.pool", "spark-exec")
      .set("spark.kubernetes.executor.label.team", "data")
      .set("spark.kubernetes.executor.annotation.prometheus.io/scrape", "true")
      .set("spark.kubernetes.authenticate.executor.serviceAccountName", "spark-exec")
      .set("spark.kubernetes.executor.secrets.db-creds", "/etc/secrets/db")
      .set("spark.kubernetes.executor.secretKeyRef.DB_PASSWORD", "db-creds:password")
      .set("spark.executorEnv.REGION", "eu-west-1")
      .set("spark.local.dir", "/tmp/spark-a,/tmp/spark-b")
      .set("spark.kubernetes.local.dirs.tmpfs", "true")
      .set(v + "hostPath.logs.mount.path", "/var/log/spark")
      .set(v + "hostPath.logs.options.path", "/mnt/spark-logs")
      .set(v + "hostPath.logs.options.type", "DirectoryOrCreate")
      .set(v + "emptyDir.scratch.mount.path", "/scratch")
      .set(v + "emptyDir.scratch.options.medium", "Memory")
      .set(v + "emptyDir.scratch.options.sizeLimit", "1Gi")
      .set(v + "nfs.shared.mount.path", "/shared")
      .set(v + "nfs.shared.mount.readOnly", "true")
      .set(v + "nfs.shared.options.server", "nfs.example.internal")
      .set(v + "nfs.shared.options.path", "/exports/shared")
      .set(v + "persistentVolumeClaim.data.mount.path", "/data")
      .set(v + "persistentVolumeClaim.data.options.claimName", "OnDemand")
      .set(v + "persistentVolumeClaim.data.options.storageClass", "fast-ssd")
      .set(v + "persistentVolumeClaim.data.options.sizeLimit", "100Gi")
      .set(v + "persistentVolumeClaim.ckpt.mount.path", "/ckpt")
      .set(v + "persistentVolumeClaim.ckpt.options.claimName", "ckpt-SPARK_EXECUTOR_ID")
      .set(v + "persistentVolumeClaim.ref.mount.path", "/ref")
      .set(v + "persistentVolumeClaim.ref.mount.readOnly", "true")
      .set(v + "persistentVolumeClaim.ref.options.claimName", "reference-data")
  }

  private def json(s: String): JsonNode = mapper.readTree(s)

  private def byName(array: JsonNode, name: String): JsonNode = {
    val found = array.elements().asScala.find(_.path("name").asText() == name)
    found.getOrElse(throw new AssertionError(s"no element named $name in $array"))
  }

  private def names(array: JsonNode): Seq[String] = array.elements().asScala.map(_.path("name").asText()).toSeq

  private def env(container: JsonNode): Map[String, JsonNode] =
    container.path("env").elements().asScala.map(e => e.path("name").asText() -> e).toMap

  /** Paths (a/b/0/c) whose scalar values differ between two JSON trees of the same shape. */
  private def diff(a: JsonNode, b: JsonNode, path: String = ""): Seq[String] = {
    if (a.isObject && b.isObject) {
      val keys = (a.fieldNames().asScala ++ b.fieldNames().asScala).toSeq.distinct.sorted
      keys.flatMap(k => diff(a.path(k), b.path(k), s"$path/$k"))
    } else if (a.isArray && b.isArray && a.size == b.size) {
      (0 until a.size).flatMap(i => diff(a.get(i), b.get(i), s"$path/$i"))
    } else if (a == b) Nil else Seq(path)
  }

  /** A builder run whose every HTTP request would be counted (and refused). */
  private def buildCounted(conf: SparkConf, profile: ResourceProfile, executorId: String)
      : (StokerExecutorPods.ExecutorPodSpec, Int, Int) = {
    val guard = new StokerExecutorPods.RefuseRequests
    val clients = new java.util.concurrent.atomic.AtomicInteger()
    val spec = StokerExecutorPods.build(conf, AppId, profile, new SecurityManager(conf),
      executorId, () => { clients.incrementAndGet(); StokerExecutorPods.offlineClient(guard) })
    (spec, guard.attempts.get(), clients.get())
  }

  @Test def buildsTheRealisticPodOfflineWithSparksOwnBuilder(): Unit = {
    val conf = realisticConf()
    val profile = ResourceProfile.getOrCreateDefaultProfile(conf)
    val started = System.nanoTime()
    val (spec, requests, clients) =
      buildCounted(conf, profile, StokerExecutorPods.PlaceholderExecutorId)
    val tookMs = (System.nanoTime() - started) / 1000000
    eq(1, clients, "the template needs the client: one offline client was made")
    eq(0, requests, "no request to any API server")

    val pod = json(spec.podJson)
    val id = StokerExecutorPods.PlaceholderExecutorId
    System.err.println(s"[pods] pod JSON ${spec.podJson.length} bytes, built in $tookMs ms:\n" +
      mapper.writerWithDefaultPrettyPrinter().writeValueAsString(pod))
    spec.resourcesJson.foreach(r => System.err.println(s"[pods] resource: $r"))

    eq("v1", pod.path("apiVersion").asText())
    eq("Pod", pod.path("kind").asText())
    val meta = pod.path("metadata")
    eq(s"$Prefix-exec-$id", meta.path("name").asText(), "pod name")
    val labels = meta.path("labels")
    eq(AppId, labels.path("spark-app-selector").asText())
    eq(id, labels.path("spark-exec-id").asText())
    eq("executor", labels.path("spark-role").asText())
    eq("0", labels.path("spark-exec-resourceprofile-id").asText())
    eq("data", labels.path("team").asText())
    eq("yes", labels.path("from-template").asText(), "template labels are kept")
    eq("true", meta.path("annotations").path("prometheus.io/scrape").asText())
    check(meta.path("ownerReferences").isMissingNode || meta.path("ownerReferences").isEmpty,
      s"no owner reference without a driver pod: ${meta.path("ownerReferences")}")

    val podSpec = pod.path("spec")
    eq("Never", podSpec.path("restartPolicy").asText())
    eq("spark-exec", podSpec.path("serviceAccountName").asText())
    eq("ssd", podSpec.path("nodeSelector").path("disktype").asText())
    eq("spark-exec", podSpec.path("nodeSelector").path("pool").asText())
    eq("dedicated", podSpec.path("tolerations").get(0).path("key").asText(), "template toleration")
    eq("NoSchedule", podSpec.path("tolerations").get(0).path("effect").asText())
    eq(Seq("log-shipper", "spark-executor"), names(podSpec.path("containers")),
      "the template's sidecar first, Spark's container last")

    val c = byName(podSpec.path("containers"), "spark-executor")
    eq("apache/spark:4.2.0", c.path("image").asText())
    eq("IfNotPresent", c.path("imagePullPolicy").asText())
    eq(Seq("executor"), c.path("args").elements().asScala.map(_.asText()).toSeq)
    val res = c.path("resources")
    eq("3500m", res.path("requests").path("cpu").asText(), "executor.request.cores")
    eq("4", res.path("limits").path("cpu").asText(), "executor.limit.cores")
    eq("6758Mi", res.path("requests").path("memory").asText(), "6144 + max(614, 384)")
    eq("6758Mi", res.path("limits").path("memory").asText())

    val e = env(c)
    eq(id, e("SPARK_EXECUTOR_ID").path("value").asText())
    eq(AppId, e("SPARK_APPLICATION_ID").path("value").asText())
    eq("4", e("SPARK_EXECUTOR_CORES").path("value").asText())
    eq("6144m", e("SPARK_EXECUTOR_MEMORY").path("value").asText())
    eq("0", e("SPARK_RESOURCE_PROFILE_ID").path("value").asText())
    eq("spark://CoarseGrainedScheduler@10.0.0.5:7078", e("SPARK_DRIVER_URL").path("value").asText())
    eq("/tmp/spark-a,/tmp/spark-b", e("SPARK_LOCAL_DIRS").path("value").asText())
    eq("eu-west-1", e("REGION").path("value").asText())
    eq("1", e("FROM_TEMPLATE").path("value").asText(), "template env is kept")
    eq("status.podIP", e("SPARK_EXECUTOR_POD_IP").path("valueFrom").path("fieldRef")
      .path("fieldPath").asText())
    eq("metadata.name", e("SPARK_EXECUTOR_POD_NAME").path("valueFrom").path("fieldRef")
      .path("fieldPath").asText())
    val dbPassword = e("DB_PASSWORD").path("valueFrom").path("secretKeyRef")
    eq("db-creds", dbPassword.path("name").asText())
    eq("password", dbPassword.path("key").asText())
    val javaOpts = e.collect { case (k, v) if k.startsWith("SPARK_JAVA_OPT_") => v.path("value").asText() }
    check(javaOpts.exists(_ == s"-Dapp.id=$AppId"), s"{{APP_ID}} is filled in: $javaOpts")
    check(javaOpts.exists(_ == s"-Dexec.id=$id"), s"{{EXECUTOR_ID}} is filled in: $javaOpts")
    check(javaOpts.exists(_ == s"-Xlog:gc:file=/var/log/spark/gc-$id.log"), s"$javaOpts")
    eq("/opt/decom.sh",
      c.path("lifecycle").path("preStop").path("exec").path("command").get(0).asText(),
      "decommission: preStop hook")

    val volumes = podSpec.path("volumes")
    val hostPath = byName(volumes, "logs").path("hostPath")
    eq("/mnt/spark-logs", hostPath.path("path").asText())
    eq("DirectoryOrCreate", hostPath.path("type").asText())
    eq("Memory", byName(volumes, "scratch").path("emptyDir").path("medium").asText())
    eq("1Gi", byName(volumes, "scratch").path("emptyDir").path("sizeLimit").asText())
    eq("nfs.example.internal", byName(volumes, "shared").path("nfs").path("server").asText())
    eq("/exports/shared", byName(volumes, "shared").path("nfs").path("path").asText())
    val dataClaim = byName(volumes, "data").path("persistentVolumeClaim").path("claimName").asText()
    check(dataClaim.matches(s"$Prefix-exec-$id-pvc-\\d+"), s"on-demand claim name: $dataClaim")
    eq(s"ckpt-$id", byName(volumes, "ckpt").path("persistentVolumeClaim").path("claimName").asText(),
      "SPARK_EXECUTOR_ID in a claim name is replaced by the executor id")
    eq("reference-data",
      byName(volumes, "ref").path("persistentVolumeClaim").path("claimName").asText())
    eq("db-creds", byName(volumes, "db-creds-volume").path("secret").path("secretName").asText())
    // The executor conf ConfigMap: a JVM-wide random name; Spark's own backend creates it in
    // KubernetesClusterSchedulerBackend.start (setUpExecutorConfigMap). Not optional.
    val confMap = byName(volumes, "spark-conf-volume-exec").path("configMap")
    check(confMap.path("name").asText().matches("spark-exec-[0-9a-f]+-conf-map"), s"$confMap")
    check(!confMap.path("optional").asBoolean(false), s"$confMap")
    eq("/opt/spark/conf", byName(c.path("volumeMounts"), "spark-conf-volume-exec").path("mountPath")
      .asText())
    eq("Memory", byName(volumes, "spark-local-dir-1").path("emptyDir").path("medium").asText(),
      "local dirs on tmpfs")
    eq("Memory", byName(volumes, "spark-local-dir-2").path("emptyDir").path("medium").asText())
    val mounts = c.path("volumeMounts").elements().asScala
      .map(m => m.path("name").asText() -> m.path("mountPath").asText()).toMap
    eq("/var/log/spark", mounts("logs"))
    eq("/scratch", mounts("scratch"))
    eq("/shared", mounts("shared"))
    eq("/data", mounts("data"))
    eq("/etc/secrets/db", mounts("db-creds-volume"))
    eq("/tmp/spark-a", mounts("spark-local-dir-1"))
    check(byName(c.path("volumeMounts"), "shared").path("readOnly").asBoolean(), "nfs read-only")

    // The builder's extra objects: one PVC for the OnDemand claim with a storage class and size.
    eq(1, spec.resources.size, s"additional resources: ${spec.resourcesJson}")
    val pvc = json(spec.resourcesJson.head)
    eq("PersistentVolumeClaim", pvc.path("kind").asText())
    eq(dataClaim, pvc.path("metadata").path("name").asText())
    eq(AppId, pvc.path("metadata").path("labels").path("spark-app-selector").asText())
    eq("fast-ssd", pvc.path("spec").path("storageClassName").asText())
    eq("100Gi", pvc.path("spec").path("resources").path("requests").path("storage").asText())
    eq("ReadWriteOncePod", pvc.path("spec").path("accessModes").get(0).asText())
  }

  /**
   * Every per-executor part of the pod, found by building the same pod for two executor ids and
   * diffing the JSON: that is exactly what stoker has to fill in.
   */
  @Test def thePerExecutorPartsAreExactlyTheseFields(): Unit = {
    val conf = realisticConf()
    val profile = ResourceProfile.getOrCreateDefaultProfile(conf)
    val (a, _, _) = buildCounted(conf, profile, "7")
    val (b, _, _) = buildCounted(conf, profile, "1234")
    val podA = json(a.podJson)
    val podB = json(b.podJson)
    val paths = diff(podA, podB)
    val described = paths.map { p =>
      val at = podA.at(p)
      s"$p = ${at.asText()}  (vs ${podB.at(p).asText()})"
    }
    System.err.println("[pods] per-executor fields:\n  " + described.mkString("\n  "))
    val containers = names(podA.path("spec").path("containers"))
    val sc = containers.indexOf("spark-executor")
    def envIndex(name: String): Int =
      names(podA.path("spec").path("containers").get(sc).path("env")).indexOf(name)
    def volIndex(name: String): Int = names(podA.path("spec").path("volumes")).indexOf(name)
    val javaOptIdx = names(podA.path("spec").path("containers").get(sc).path("env")).zipWithIndex
      .collect { case (n, i) if n.startsWith("SPARK_JAVA_OPT_") &&
        podA.path("spec").path("containers").get(sc).path("env").get(i).path("value").asText()
          .matches(".*(exec\\.id=7|gc-7\\.log)") => i }
    val expected = (Seq(
      "/metadata/name",
      "/metadata/labels/spark-exec-id",
      "/spec/hostname",
      s"/spec/containers/$sc/env/${envIndex("SPARK_EXECUTOR_ID")}/value",
      s"/spec/volumes/${volIndex("data")}/persistentVolumeClaim/claimName",
      s"/spec/volumes/${volIndex("ckpt")}/persistentVolumeClaim/claimName") ++
      javaOptIdx.map(i => s"/spec/containers/$sc/env/$i/value")).sorted
    eq(expected, paths.sorted, "the per-executor fields")
    eq(Seq("/metadata/name"), diff(json(a.resourcesJson.head), json(b.resourcesJson.head)),
      "the on-demand PVC differs only by its name")
    // <n> is the index of the volume among the spark.kubernetes.executor.volumes.* volumes in
    // the order Spark parsed them (not the order of the keys, not the pod's volume list).
    val userVolumes = names(podA.path("spec").path("volumes"))
      .filter(Set("logs", "scratch", "shared", "data", "ckpt", "ref"))
    eq(s"$Prefix-exec-7-pvc-${userVolumes.indexOf("data")}",
      json(a.resourcesJson.head).path("metadata").path("name").asText(),
      "on-demand PVC name: <prefix>-exec-<id>-pvc-<index of the volume among the volume keys>")
  }

  @Test def aNonDefaultProfileGetsItsOwnSizes(): Unit = {
    val conf = realisticConf()
    ResourceProfile.getOrCreateDefaultProfile(conf)
    val rp = new ResourceProfileBuilder()
      .require(new ExecutorResourceRequests().cores(2).memory("2g").memoryOverhead("1g"))
      .build()
    val (spec, requests, _) = buildCounted(conf, rp, StokerExecutorPods.PlaceholderExecutorId)
    eq(0, requests)
    val pod = json(spec.podJson)
    eq(rp.id.toString, pod.path("metadata").path("labels").path("spark-exec-resourceprofile-id")
      .asText())
    val c = byName(pod.path("spec").path("containers"), "spark-executor")
    eq("3072Mi", c.path("resources").path("requests").path("memory").asText(), "2048 + 1024")
    eq("2", env(c)("SPARK_EXECUTOR_CORES").path("value").asText())
    eq(rp.id.toString, env(c)("SPARK_RESOURCE_PROFILE_ID").path("value").asText())
    System.err.println(s"[pods] profile ${rp.id} resources: ${c.path("resources")}")
  }

  @Test def withoutATemplateNoClientIsMade(): Unit = {
    val conf = realisticConf().remove("spark.kubernetes.executor.podTemplateFile")
    val profile = ResourceProfile.getOrCreateDefaultProfile(conf)
    val spec = StokerExecutorPods.build(conf, AppId, profile, new SecurityManager(conf),
      newClient = () => throw new AssertionError("no client without a pod template"))
    val pod = json(spec.podJson)
    eq(Seq("spark-kubernetes-executor"), names(pod.path("spec").path("containers")),
      "Spark's default container name")
    check(pod.path("spec").path("tolerations").isMissingNode ||
      pod.path("spec").path("tolerations").isEmpty, "no template, no tolerations")
  }

  /** stoker must recompute spec.hostname from the final pod name: it keeps the last 63 chars. */
  @Test def theHostnameIsTheTailOfThePodName(): Unit = {
    val longPrefix = "a-very-long-application-name-that-goes-on-and-on-" + "x" * 20
    val conf = realisticConf().set("spark.kubernetes.executor.podNamePrefix", longPrefix)
    val profile = ResourceProfile.getOrCreateDefaultProfile(conf)
    val (spec, _, _) = buildCounted(conf, profile, "42")
    val pod = json(spec.podJson)
    val name = pod.path("metadata").path("name").asText()
    eq(s"$longPrefix-exec-42", name)
    eq(name.takeRight(63).replaceAll("^[^\\w]+", "").replaceAll("[^\\w-]+", "_"),
      pod.path("spec").path("hostname").asText())
    System.err.println(s"[pods] long name $name -> hostname ${pod.path("spec").path("hostname")}")
  }

  @Test def theConfMapCanBeLeftOut(): Unit = {
    val conf = realisticConf().set("spark.kubernetes.executor.disableConfigMap", "true")
    val (spec, _, _) = buildCounted(conf, ResourceProfile.getOrCreateDefaultProfile(conf),
      StokerExecutorPods.PlaceholderExecutorId)
    val pod = json(spec.podJson)
    check(!names(pod.path("spec").path("volumes")).contains("spark-conf-volume-exec"),
      s"${pod.path("spec").path("volumes")}")
  }

  /** The guard is not vacuous: a request through the offline client is counted and refused. */
  @Test def theOfflineClientRefusesRequests(): Unit = {
    val guard = new StokerExecutorPods.RefuseRequests
    val client = StokerExecutorPods.offlineClient(guard)
    try {
      intercept[Exception](client.pods().inNamespace("team-a").list())
    } finally client.close()
    eq(1, guard.attempts.get(), "the request was seen before it was sent")
  }

  @Test def aStablePrefixIsRequired(): Unit = {
    val conf = realisticConf().remove("spark.kubernetes.executor.podNamePrefix")
    val profile = ResourceProfile.getOrCreateDefaultProfile(conf)
    intercept[SparkException](
      StokerExecutorPods.build(conf, AppId, profile, new SecurityManager(conf)))
    val prefix = StokerExecutorPods.ensurePodNamePrefix(conf)
    check(prefix.startsWith("etl-nightly-"), prefix)
    eq(prefix, StokerExecutorPods.ensurePodNamePrefix(conf), "stable once set")
  }
}
