package org.apache.spark.scheduler.cluster.stoker

import scala.jdk.CollectionConverters._

import com.fasterxml.jackson.databind.ObjectMapper
import org.junit.jupiter.api.{AfterEach, BeforeEach, Test}

import org.apache.spark.{SecurityManager, SparkConf}
import org.apache.spark.resource.ResourceProfile

/** What the scheduler backend sends stoker about Spark-built pods (the protocol's SparkPods). */
class StokerSparkPodsTest extends Checks {

  private val mapper = new ObjectMapper()
  private val AppId = "spark-0123456789abcdef"
  private val V = "spark.kubernetes.executor.volumes."

  @BeforeEach def setUp(): Unit = ResourceProfile.clearDefaultProfile()
  @AfterEach def tearDown(): Unit = ResourceProfile.clearDefaultProfile()

  private def conf(): SparkConf = new SparkConf(false)
    .set("spark.app.name", "ETL nightly")
    .set("spark.driver.host", "10.0.0.5")
    .set("spark.driver.port", "7078")
    .set("spark.kubernetes.namespace", "team-a")
    .set("spark.kubernetes.container.image", "apache/spark:4.2.0")
    .set(V + "hostPath.data.mount.path", "/data")
    .set(V + "hostPath.data.options.path", "/srv/data")
    .set("spark.kubernetes.executor.secrets.s1", "/mnt/s1")
    .set("spark.kubernetes.executor.secretKeyRef.MY_SECRET", "s1:k")

  private def pod(c: SparkConf) = {
    StokerSparkPods.appLevel(c, AppId)
    StokerSparkPods.profilePod(c, AppId, ResourceProfile.getOrCreateDefaultProfile(c),
      new SecurityManager(c))
  }

  @Test def sparksClassesAreOnTheTestClassPath(): Unit =
    check(StokerSparkPods.available(), "spark-kubernetes and fabric8 are loadable")

  @Test def theIssuesExampleBuildsAPodWithTheVolumeTheSecretAndTheEnvVar(): Unit = {
    val p = pod(conf())
    eq("", p.getError)
    val json = mapper.readTree(p.getPodJson)
    val volumes = json.path("spec").path("volumes").elements().asScala.toSeq
    check(volumes.exists(_.path("hostPath").path("path").asText() == "/srv/data"), s"$volumes")
    check(volumes.exists(_.path("secret").path("secretName").asText() == "s1"), s"$volumes")
    val env = json.path("spec").path("containers").elements().asScala.toSeq.last.path("env")
    check(env.elements().asScala.exists(e => e.path("name").asText() == "MY_SECRET" &&
      e.path("valueFrom").path("secretKeyRef").path("key").asText() == "k"), s"$env")
  }

  /** Each refused with the key named, before Spark's builder runs. */
  @Test def badInputNamesTheKey(): Unit = {
    val cases = Seq(
      conf().remove(V + "hostPath.data.mount.path") -> s"${V}hostPath.data.mount.path: missing",
      conf().set(V + "gluster.data.mount.path", "/g") ->
        s"${V}gluster.data.mount.path: unknown volume type 'gluster'",
      conf().set("spark.kubernetes.executor.secretKeyRef.MY_SECRET", "s1") ->
        "spark.kubernetes.executor.secretKeyRef.MY_SECRET: 's1' is not <secret name>:<key>")
    cases.foreach { case (c, named) =>
      val p = pod(c)
      check(p.getError.startsWith(named), s"'${p.getError}' starts with '$named'")
      eq("", p.getPodJson)
    }
  }

  /** Whatever else Spark's builder throws reaches stoker as the error, not as an exception. */
  @Test def aBuilderFailureBecomesTheError(): Unit = {
    val p = pod(conf().set("spark.kubernetes.executor.podTemplateFile", "/no/such/template.yaml"))
    check(p.getError.nonEmpty, "an error")
    eq("", p.getPodJson)
  }

  @Test def keysStokerDoesNotHonourAreListedWithStrictness(): Unit = {
    val c = conf()
      .set("spark.kubernetes.executor.podDeletionCost", "5")
      .set("spark.kubernetes.allocation.pods.allocator", "direct")
      .set(StokerSparkPods.StrictConfKey, "true")
    val app = StokerSparkPods.appLevel(c, AppId).build()
    eq(Set("spark.kubernetes.executor.podDeletionCost"),
      app.getUnsupportedKeysMap.asScala.keySet.toSet, "the direct allocator is stoker's way too")
    check(app.getStrict, "strict")
    check(!StokerSparkPods.appLevel(conf(), AppId).build().getStrict, "not strict by default")
    eq(0, StokerSparkPods.appLevel(conf(), AppId).build().getUnsupportedKeysCount)
  }

  /** Spark's allocator: `maxPVCs` claims, only when it waits at all (own, reuse and wait). */
  @Test def claimsBeforeWaitingIsSparksMaxPvcs(): Unit = {
    val W = "spark.kubernetes.driver.waitToReusePersistentVolumeClaim"
    def sent(c: SparkConf) = StokerSparkPods.appLevel(c, AppId).build().getClaimsBeforeWaiting
    eq(0, sent(conf()), "Spark's default: no waiting")
    eq(2, sent(conf().set(W, "true")), "spark.executor.instances' default")
    eq(5, sent(conf().set(W, "true").set("spark.executor.instances", "5")))
    eq(7, sent(conf().set(W, "true").set("spark.dynamicAllocation.enabled", "true")
      .set("spark.dynamicAllocation.shuffleTracking.enabled", "true")
      .set("spark.dynamicAllocation.maxExecutors", "7")))
    eq(0, sent(conf().set(W, "true").set("spark.kubernetes.driver.reusePersistentVolumeClaim",
      "false")))
    eq(0, sent(conf().set(W, "true").set("spark.kubernetes.driver.ownPersistentVolumeClaim",
      "false")))
  }

  @Test def theExecutorConfigMapIsSparksAndCanBeLeftOut(): Unit = {
    val c = conf()
    val app = StokerSparkPods.appLevel(c, AppId).build()
    eq(1, app.getAppResourcesJsonCount)
    val cm = mapper.readTree(app.getAppResourcesJson(0))
    eq("ConfigMap", cm.path("kind").asText())
    check(cm.path("metadata").path("name").asText().matches("spark-exec-[0-9a-f]+-conf-map"),
      s"$cm")
    eq(AppId, cm.path("metadata").path("labels").path("spark-app-selector").asText())
    eq("executor", cm.path("metadata").path("labels").path("spark-role").asText())
    eq("team-a", cm.path("data").path("spark.kubernetes.namespace").asText())
    // The pod mounts the same ConfigMap.
    val podJson = pod(c).getPodJson
    check(podJson.contains(cm.path("metadata").path("name").asText()), podJson)
    eq(0, StokerSparkPods.appLevel(conf().set("spark.kubernetes.executor.disableConfigMap", "true"),
      AppId).build().getAppResourcesJsonCount)
  }

  @Test def withoutAnImageStokersIsUsed(): Unit = {
    val c = conf().remove("spark.kubernetes.container.image")
    check(StokerSparkPods.appLevel(c, AppId).build().getImageFromServer, "image from server")
    val p = pod(c)
    eq("", p.getError)
    check(p.getPodJson.contains(StokerSparkPods.ImagePlaceholder), p.getPodJson)
    check(!c.contains("spark.kubernetes.executor.container.image"), "the driver's conf is unchanged")
  }

  @Test def thePodNamePrefixIsStable(): Unit = {
    val c = conf()
    StokerSparkPods.appLevel(c, AppId)
    val prefix = c.get("spark.kubernetes.executor.podNamePrefix")
    StokerSparkPods.appLevel(c, AppId)
    eq(prefix, c.get("spark.kubernetes.executor.podNamePrefix"))
  }
}
