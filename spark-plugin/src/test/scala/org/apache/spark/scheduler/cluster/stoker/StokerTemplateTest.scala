package org.apache.spark.scheduler.cluster.stoker

import java.nio.charset.StandardCharsets
import java.nio.file.Files

import scala.jdk.CollectionConverters._

import dev.stoker.proto.v1.{ResourceProfile => ProtoProfile}
import org.junit.jupiter.api.Test

import org.apache.spark.{SecurityManager, SparkConf, SparkException}
import org.apache.spark.resource.ExecutorResourceRequests

class StokerTemplateTest extends Checks {

  private def conf(kv: (String, String)*): SparkConf = {
    val c = new SparkConf(false)
      .set("spark.driver.host", "10.0.0.5")
      .set("spark.driver.port", "7078")
    kv.foreach { case (k, v) => c.set(k, v) }
    c
  }

  private def default(kv: (String, String)*): ProtoProfile =
    StokerTemplate.profile(0, Map.empty, conf(kv: _*))

  private def noFile(path: String): String = throw new AssertionError(s"unexpected read of $path")

  @Test def overheadDefaultsToTheMinimum(): Unit = {
    val p = default()
    eq(0, p.getId)
    eq(1, p.getCores)
    eq(1024L, p.getHeapMib)
    eq(384L, p.getOverheadMib, "max(0.1 * 1024, 384)")
    eq(0L, p.getOffHeapMib)
    eq(0L, p.getPysparkMib)
  }

  @Test def overheadFollowsTheFactor(): Unit = {
    eq(819L, default("spark.executor.memory" -> "8g").getOverheadMib, "0.1 * 8192")
    eq(819L, default("spark.executor.memory" -> "4g",
      "spark.executor.memoryOverheadFactor" -> "0.2").getOverheadMib, "0.2 * 4096")
    eq(1228L, default("spark.executor.memory" -> "4g",
      "spark.kubernetes.memoryOverheadFactor" -> "0.3").getOverheadMib, "k8s factor 0.3 * 4096")
    eq(409L, default("spark.executor.memory" -> "4g",
      "spark.kubernetes.memoryOverheadFactor" -> "0.3",
      "spark.executor.memoryOverheadFactor" -> "0.1").getOverheadMib,
      "spark.executor.memoryOverheadFactor wins over the k8s one; 409 >= 384")
    eq(1024L, default("spark.executor.memory" -> "2g",
      "spark.executor.minMemoryOverhead" -> "1g").getOverheadMib, "the minimum is configurable")
  }

  @Test def explicitOverheadWins(): Unit = {
    eq(100L, default("spark.executor.memory" -> "8g",
      "spark.executor.memoryOverhead" -> "100m").getOverheadMib,
      "an explicit overhead is used even below the minimum")
    eq(3072L, default("spark.executor.memoryOverhead" -> "3g",
      "spark.executor.memoryOverheadFactor" -> "0.5").getOverheadMib)
  }

  @Test def coresOffHeapPysparkAndCustomResources(): Unit = {
    val p = default(
      "spark.executor.cores" -> "4",
      "spark.executor.memory" -> "6g",
      "spark.memory.offHeap.enabled" -> "true",
      "spark.memory.offHeap.size" -> "2g",
      "spark.executor.pyspark.memory" -> "512m",
      "spark.executor.resource.gpu.amount" -> "2",
      "spark.executor.resource.gpu.vendor" -> "nvidia.com")
    eq(4, p.getCores)
    eq(6144L, p.getHeapMib)
    eq(614L, p.getOverheadMib)
    eq(2048L, p.getOffHeapMib)
    eq(512L, p.getPysparkMib)
    eq(Map("gpu" -> 2L), p.getResourcesMap.asScala.map { case (k, v) => k -> v.longValue }.toMap)
    eq(Map("gpu" -> "nvidia.com"), p.getResourceVendorsMap.asScala.toMap)
    eq(0L, default("spark.memory.offHeap.size" -> "2g").getOffHeapMib,
      "off-heap size counts only when off-heap is enabled")
  }

  @Test def nonDefaultProfileOverridesTheDefaults(): Unit = {
    val c = conf("spark.executor.cores" -> "2", "spark.executor.memory" -> "2g",
      "spark.executor.resource.fpga.amount" -> "1")
    val reqs = new ExecutorResourceRequests().cores(3).memory("6g")
      .resource("gpu", 1, "", "nvidia.com")
    val p = StokerTemplate.profile(3, reqs.requests, c)
    eq(3, p.getId)
    eq(3, p.getCores)
    eq(6144L, p.getHeapMib)
    eq(614L, p.getOverheadMib, "computed from this profile's heap")
    eq(Map("gpu" -> 1L), p.getResourcesMap.asScala.map { case (k, v) => k -> v.longValue }.toMap,
      "only the profile's own custom resources")
    eq("nvidia.com", p.getResourceVendorsOrThrow("gpu"))

    val withOverhead = StokerTemplate.profile(4,
      new ExecutorResourceRequests().memoryOverhead("1g").pysparkMemory("300m").requests, c)
    eq(2, withOverhead.getCores, "cores fall back to spark.executor.cores")
    eq(2048L, withOverhead.getHeapMib)
    eq(1024L, withOverhead.getOverheadMib)
    eq(300L, withOverhead.getPysparkMib)
  }

  @Test def driverUrlEnvironmentJavaOptionsAndStartupConf(): Unit = {
    val c = conf(
      "spark.executor.extraJavaOptions" ->
        "-XX:+UseG1GC -Dfoo=\"a b\" -Dapp={{APP_ID}} -Dexec={{EXECUTOR_ID}}",
      "spark.executor.defaultJavaOptions" -> "-Xss4m",
      "spark.executor.extraClassPath" -> "/opt/extra/*",
      "spark.authenticate" -> "true",
      "spark.authenticate.secret" -> "s3cr3t",
      "spark.rpc.askTimeout" -> "10s",
      "spark.network.timeout" -> "200s",
      "spark.ssl.enabled" -> "true",
      "spark.ssl.keyPassword" -> "pw",
      "spark.blockManager.port" -> "7079",
      "spark.port.maxRetries" -> "4",
      "spark.executor.memory" -> "2g",
      "spark.app.name" -> "demo")
    val t = StokerTemplate.build(c, "app-1", "alice", Map("FOO" -> "bar"), Some("s3cr3t"),
      Seq(StokerTemplate.profile(5, Map.empty, c), StokerTemplate.profile(0, Map.empty, c)),
      noFile)
    eq("spark://CoarseGrainedScheduler@10.0.0.5:7078", t.getDriverUrl)
    eq(org.apache.spark.SPARK_VERSION, t.getSparkVersion)
    eq("4.2.0", t.getSparkVersion, "built against Spark 4.2.0")
    eq("alice", t.getSparkUser)
    eq(Seq(0, 5), t.getProfilesList.asScala.map(_.getId).toSeq, "profiles sorted by id")
    eq(Map("FOO" -> "bar", "SPARK_USER" -> "alice"), t.getEnvironmentMap.asScala.toMap)
    eq(Seq("-Xss4m", "-XX:+UseG1GC", "-Dfoo=a b", "-Dapp=app-1", "-Dexec={{EXECUTOR_ID}}"),
      t.getJavaOptionsList.asScala.toSeq)
    check(t.getExtraClassPath.endsWith("/opt/extra/*"), t.getExtraClassPath)
    eq(Map(
      "spark.authenticate" -> "true",
      "spark.rpc.askTimeout" -> "10s",
      "spark.network.timeout" -> "200s",
      "spark.ssl.enabled" -> "true",
      "spark.driver.port" -> "7078",
      "spark.blockManager.port" -> "7079",
      "spark.port.maxRetries" -> "4"), t.getStartupConfMap.asScala.toMap,
      "only executor start-up confs; never the secret or SSL passwords")
    eq("s3cr3t", t.getAuthSecret)
  }

  @Test def authSecretOnlyWhenAuthenticationIsOn(): Unit = {
    val on = conf("spark.authenticate" -> "true", "spark.authenticate.secret" -> "xyz")
    eq(Some("xyz"), StokerTemplate.authSecret(on, new SecurityManager(on)))
    val off = conf("spark.authenticate.secret" -> "xyz")
    eq(None, StokerTemplate.authSecret(off, new SecurityManager(off)))
    val ownFile = conf("spark.authenticate" -> "true", "spark.authenticate.secret" -> "xyz",
      "spark.authenticate.secret.executor.file" -> "/etc/secret")
    eq(None, StokerTemplate.authSecret(ownFile, new SecurityManager(ownFile)),
      "executors that read their own secret file get none")
    val t = StokerTemplate.build(off, "a", "u", Map.empty, None, Nil, noFile)
    eq("", t.getAuthSecret)
  }

  @Test def kubernetesSettings(): Unit = {
    val template = Files.createTempFile("stoker-pod-template", ".yaml")
    try {
      val yaml = "apiVersion: v1\nkind: Pod\nspec:\n  priorityClassName: high\n"
      Files.write(template, yaml.getBytes(StandardCharsets.UTF_8))
      val c = conf(
        "spark.kubernetes.namespace" -> "spark-jobs",
        "spark.kubernetes.container.image" -> "img:1",
        "spark.kubernetes.executor.container.image" -> "exec:2",
        "spark.kubernetes.container.image.pullPolicy" -> "Always",
        "spark.kubernetes.container.image.pullSecrets" -> "a, b,,",
        "spark.kubernetes.authenticate.executor.serviceAccountName" -> "exec-sa",
        "spark.kubernetes.authenticate.driver.serviceAccountName" -> "driver-sa",
        "spark.kubernetes.authenticate.driver.oauthToken" -> "TOKEN-VALUE",
        "spark.kubernetes.node.selector.zone" -> "a",
        "spark.kubernetes.executor.node.selector.zone" -> "b",
        "spark.kubernetes.executor.node.selector.disk" -> "ssd",
        "spark.kubernetes.executor.scheduler.name" -> "volcano",
        "spark.kubernetes.executor.podTemplateFile" -> template.toString,
        "spark.kubernetes.executor.request.cores" -> "500m",
        "spark.kubernetes.executor.limit.cores" -> "2",
        "spark.kubernetes.driver.pod.name" -> "driver-pod",
        "spark.kubernetes.executor.label.team" -> "data",
        "spark.kubernetes.executor.annotation.note" -> "app={{APP_ID}}",
        "spark.kubernetes.executor.deleteOnTermination" -> "false",
        "spark.kubernetes.allocation.batch.size" -> "50")
      val t = StokerTemplate.build(c, "app-9", "u", Map.empty, None, Nil,
        StokerTemplate.readPodTemplate(_, c))
      val k = t.getKubernetes
      eq("spark-jobs", k.getNamespace)
      eq("exec:2", k.getImage, "the executor image wins over the common one")
      eq("Always", k.getImagePullPolicy)
      eq(Seq("a", "b"), k.getImagePullSecretsList.asScala.toSeq)
      eq("exec-sa", k.getServiceAccount)
      eq(Map("zone" -> "b", "disk" -> "ssd"), k.getNodeSelectorMap.asScala.toMap,
        "executor node selectors override the common ones")
      eq("volcano", k.getSchedulerName)
      eq(yaml, k.getPodTemplateYaml)
      eq("500m", k.getRequestCores)
      eq("2", k.getLimitCores)
      eq("driver-pod", k.getDriverPodName)
      eq("", k.getDriverPodUid)
      eq(Map("team" -> "data"), t.getLabelsMap.asScala.toMap)
      eq(Map("note" -> "app=app-9"), t.getAnnotationsMap.asScala.toMap)
      eq(Map(
        "spark.kubernetes.executor.deleteOnTermination" -> "false",
        "spark.kubernetes.allocation.batch.size" -> "50"), k.getOtherMap.asScala.toMap,
        "other keys only: modelled keys and credentials are not repeated")
      check(!t.toString.contains("TOKEN-VALUE"), "driver credentials are never sent")
    } finally {
      Files.deleteIfExists(template)
    }
  }

  @Test def kubernetesDefaultsAndFallbacks(): Unit = {
    val k = StokerTemplate.build(conf(
      "spark.kubernetes.container.image" -> "img:1",
      "spark.kubernetes.authenticate.driver.serviceAccountName" -> "driver-sa",
      "spark.kubernetes.scheduler.name" -> "yunikorn"), "a", "u", Map.empty, None, Nil,
      noFile).getKubernetes
    eq("default", k.getNamespace)
    eq("img:1", k.getImage)
    eq("IfNotPresent", k.getImagePullPolicy)
    eq("driver-sa", k.getServiceAccount, "executors fall back to the driver's service account")
    eq("yunikorn", k.getSchedulerName)
    eq("", k.getPodTemplateYaml)
    eq(0, k.getOtherCount)
  }

  @Test def unreadablePodTemplateIsAClearError(): Unit = {
    val c = conf("spark.kubernetes.executor.podTemplateFile" -> "/nonexistent/pod.yaml")
    val e = intercept[SparkException](
      StokerTemplate.build(c, "a", "u", Map.empty, None, Nil, StokerTemplate.readPodTemplate(_, c)))
    check(e.getMessage.contains("spark.kubernetes.executor.podTemplateFile"), e.getMessage)
    check(e.getMessage.contains("/nonexistent/pod.yaml"), e.getMessage)
  }

  @Test def failurePolicyFollowsSparksRule(): Unit = {
    eq(3, StokerTemplate.failurePolicy(conf()).getMaxFailures, "max(3, 2 * 0)")
    eq(20, StokerTemplate.failurePolicy(conf("spark.executor.instances" -> "10")).getMaxFailures)
    eq(100, StokerTemplate.failurePolicy(conf(
      "spark.dynamicAllocation.enabled" -> "true",
      "spark.dynamicAllocation.maxExecutors" -> "50",
      "spark.executor.instances" -> "10")).getMaxFailures, "2 * maxExecutors")
    eq(Int.MaxValue, StokerTemplate.failurePolicy(conf(
      "spark.dynamicAllocation.enabled" -> "true")).getMaxFailures, "unbounded executors")
    val explicit = StokerTemplate.failurePolicy(conf(
      "spark.executor.maxNumFailures" -> "7",
      "spark.executor.failuresValidityInterval" -> "1h"))
    eq(7, explicit.getMaxFailures)
    eq(3600000L, explicit.getValidityIntervalMs)
    eq(0L, StokerTemplate.failurePolicy(conf()).getValidityIntervalMs)
  }

  @Test def resizeIsOnByDefaultWithFactorOneAndAHalf(): Unit = {
    val r = StokerTemplate.build(conf(), "a", "u", Map.empty, None, Nil, noFile).getResize
    check(r.getEnabled, "enabled by default")
    eq(1.5, r.getFactor)
    eq(0L, r.getMaxMemoryMib, "no ceiling: the server's default")
    eq("", r.getSizingKey, "no application name: nothing remembered")
    eq("nightly", StokerTemplate.resizePolicy(conf("spark.app.name" -> "nightly")).getSizingKey,
      "the sizing key defaults to the application name")
    eq("etl", StokerTemplate.resizePolicy(conf("spark.app.name" -> "nightly",
      "spark.stoker.sizing.key" -> "etl")).getSizingKey)
  }

  @Test def resizeSettingsAreRead(): Unit = {
    val r = StokerTemplate.resizePolicy(conf(
      "spark.stoker.resize.enabled" -> "false",
      "spark.stoker.resize.factor" -> "2",
      "spark.stoker.resize.maxMemory" -> "8g"))
    check(!r.getEnabled, "disabled")
    eq(2.0, r.getFactor)
    eq(8192L, r.getMaxMemoryMib)
    eq(1536L, StokerTemplate.resizePolicy(conf("spark.stoker.resize.maxMemory" -> "1536"))
      .getMaxMemoryMib, "a plain number is MiB, as for spark.executor.memory")
  }

  @Test def malformedResizeSettingsNameTheKey(): Unit = {
    for ((key, value) <- Seq(
      "spark.stoker.resize.factor" -> "big",
      "spark.stoker.resize.maxMemory" -> "lots",
      "spark.stoker.resize.maxMemory" -> "0",
      "spark.stoker.resize.enabled" -> "maybe")) {
      val e = intercept[SparkException](StokerTemplate.resizePolicy(conf(key -> value)))
      check(e.getMessage.contains(key) && e.getMessage.contains(value), e.getMessage)
    }
  }
}
