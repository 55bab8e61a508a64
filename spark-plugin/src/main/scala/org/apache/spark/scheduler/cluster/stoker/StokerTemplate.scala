/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.net.URI
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Paths}

import scala.jdk.CollectionConverters._

import dev.stoker.proto.v1.{ExecutorTemplate, FailurePolicy, KubernetesSettings, ResizePolicy, ResourceProfile => ProtoProfile}

import org.apache.spark.{SecurityManager, SPARK_VERSION, SparkConf, SparkException}
import org.apache.spark.deploy.ExecutorFailureTracker
import org.apache.spark.deploy.SparkHadoopUtil
import org.apache.spark.internal.config._
import org.apache.spark.internal.config.Python.PYSPARK_EXECUTOR_MEMORY
import org.apache.spark.resource.{ExecutorResourceRequest, ResourceProfile, ResourceUtils}
import org.apache.spark.rpc.RpcEndpointAddress
import org.apache.spark.scheduler.cluster.CoarseGrainedSchedulerBackend
import org.apache.spark.network.util.JavaUtils
import org.apache.spark.util.Utils

/**
 * Builds the protocol's [[ExecutorTemplate]] from a driver's SparkConf: pure functions of their
 * arguments, so they are tested with plain SparkConf objects.
 */
private[spark] object StokerTemplate {

  /** Spark's default overhead factor (spark.executor.memoryOverheadFactor). */
  val DefaultOverheadFactor = 0.1
  /** The Kubernetes-specific factor that Spark's Kubernetes backend honours. */
  val KubernetesOverheadFactorKey = "spark.kubernetes.memoryOverheadFactor"
  /** A pod template larger than this is refused rather than sent. */
  val MaxPodTemplateBytes: Long = 1L << 20

  object K8sKeys {
    val Prefix = "spark.kubernetes."
    val Namespace = "spark.kubernetes.namespace"
    val Image = "spark.kubernetes.container.image"
    val ExecutorImage = "spark.kubernetes.executor.container.image"
    val PullPolicy = "spark.kubernetes.container.image.pullPolicy"
    val PullSecrets = "spark.kubernetes.container.image.pullSecrets"
    val AuthPrefix = "spark.kubernetes.authenticate."
    val ExecutorServiceAccount = "spark.kubernetes.authenticate.executor.serviceAccountName"
    val DriverServiceAccount = "spark.kubernetes.authenticate.driver.serviceAccountName"
    val NodeSelectorPrefix = "spark.kubernetes.node.selector."
    val ExecutorNodeSelectorPrefix = "spark.kubernetes.executor.node.selector."
    val ExecutorSchedulerName = "spark.kubernetes.executor.scheduler.name"
    val SchedulerName = "spark.kubernetes.scheduler.name"
    val PodTemplateFile = "spark.kubernetes.executor.podTemplateFile"
    val RequestCores = "spark.kubernetes.executor.request.cores"
    val LimitCores = "spark.kubernetes.executor.limit.cores"
    val DriverPodName = "spark.kubernetes.driver.pod.name"
    val LabelPrefix = "spark.kubernetes.executor.label."
    val AnnotationPrefix = "spark.kubernetes.executor.annotation."
  }

  /** `spark://CoarseGrainedScheduler@host:port`, as Spark's own backends build it. */
  def driverUrl(conf: SparkConf): String =
    RpcEndpointAddress(conf.get(DRIVER_HOST_ADDRESS), conf.get(DRIVER_PORT),
      CoarseGrainedSchedulerBackend.ENDPOINT_NAME).toString

  /**
   * The overhead factor: spark.executor.memoryOverheadFactor when set, else the Kubernetes
   * backend's spark.kubernetes.memoryOverheadFactor when set, else 0.1.
   */
  def memoryOverheadFactor(conf: SparkConf): Double = {
    if (conf.contains(EXECUTOR_MEMORY_OVERHEAD_FACTOR)) {
      conf.get(EXECUTOR_MEMORY_OVERHEAD_FACTOR)
    } else {
      conf.getOption(KubernetesOverheadFactorKey).map { v =>
        val f = try v.trim.toDouble catch {
          case _: NumberFormatException =>
            throw new SparkException(s"$KubernetesOverheadFactorKey: '$v' is not a number")
        }
        if (f <= 0) throw new SparkException(s"$KubernetesOverheadFactorKey: must be > 0, got $v")
        f
      }.getOrElse(DefaultOverheadFactor)
    }
  }

  /**
   * Spark's rule: the explicit overhead when given, else
   * max(factor * heap, spark.executor.minMemoryOverhead (384 MiB)).
   */
  def memoryOverheadMiB(conf: SparkConf, heapMiB: Long, explicit: Option[Long]): Long =
    explicit.getOrElse(math.max((memoryOverheadFactor(conf) * heapMiB).toLong,
      conf.get(EXECUTOR_MIN_MEMORY_OVERHEAD)))

  /**
   * What each executor of one resource profile gets, as Spark's
   * ResourceProfile.getResourcesForClusterManager computes it: the default profile from the
   * spark.executor.* keys; another profile overrides those with its own executor resources and
   * carries only its own custom resources. One deliberate difference: when a non-default profile
   * sets the heap but no overhead, the overhead is computed from that profile's heap (Spark uses
   * the default profile's heap, which undersizes the container of a larger profile).
   */
  def profile(
      id: Int,
      executorResources: Map[String, ExecutorResourceRequest],
      conf: SparkConf): ProtoProfile = {
    var cores: Long = conf.get(EXECUTOR_CORES).toLong
    var heapMiB: Long = conf.get(EXECUTOR_MEMORY)
    var overheadMiB: Option[Long] = conf.get(EXECUTOR_MEMORY_OVERHEAD)
    var offHeapMiB: Long = Utils.executorOffHeapMemorySizeAsMb(conf).toLong
    var pysparkMiB: Long = conf.get(PYSPARK_EXECUTOR_MEMORY).getOrElse(0L)
    // name -> (amount, vendor)
    val custom = scala.collection.mutable.LinkedHashMap[String, (Long, String)]()

    if (id == ResourceProfile.DEFAULT_RESOURCE_PROFILE_ID) {
      ResourceUtils.parseAllResourceRequests(conf, SPARK_EXECUTOR_PREFIX).foreach { req =>
        custom(req.id.resourceName) = (req.amount, req.vendor.orElse(""))
      }
    } else {
      executorResources.foreach { case (name, req) =>
        name match {
          case ResourceProfile.MEMORY => heapMiB = req.amount
          case ResourceProfile.OVERHEAD_MEM => overheadMiB = Some(req.amount)
          case ResourceProfile.PYSPARK_MEM => pysparkMiB = req.amount
          case ResourceProfile.OFFHEAP_MEM =>
            offHeapMiB = ResourceProfile.executorOffHeapMemorySizeAsMb(conf, req)
          case ResourceProfile.CORES => cores = req.amount
          case other => custom(other) = (req.amount, Option(req.vendor).getOrElse(""))
        }
      }
    }

    val b = ProtoProfile.newBuilder()
      .setId(id)
      .setCores(cores.toInt)
      .setHeapMib(heapMiB)
      .setOverheadMib(memoryOverheadMiB(conf, heapMiB, overheadMiB))
      .setOffHeapMib(offHeapMiB)
      .setPysparkMib(pysparkMiB)
    custom.foreach { case (name, (amount, vendor)) =>
      b.putResources(name, amount)
      if (vendor.nonEmpty) b.putResourceVendors(name, vendor)
    }
    b.build()
  }

  def profile(rp: ResourceProfile, conf: SparkConf): ProtoProfile =
    profile(rp.id, rp.executorResources, conf)

  /**
   * spark.executor.extraJavaOptions (with spark.executor.defaultJavaOptions prepended), with
   * {{APP_ID}} substituted and split into arguments as Spark splits them. {{EXECUTOR_ID}} is left
   * for stoker to substitute per executor.
   */
  def javaOptions(conf: SparkConf, appId: String): Seq[String] =
    conf.get(EXECUTOR_JAVA_OPTIONS).toSeq.flatMap { opts =>
      Utils.splitCommandString(Utils.substituteAppId(opts, appId))
    }

  /**
   * The configuration an executor needs before it can reach the driver (SparkConf's own
   * isExecutorStartupConf: spark.auth*, spark.rpc.*, spark.network.*, spark.ssl.* without
   * passwords, ports), never the authentication secret itself.
   */
  def startupConf(conf: SparkConf): Map[String, String] =
    conf.getAll.iterator
      .filter { case (k, _) => SparkConf.isExecutorStartupConf(k) }
      .filter { case (k, _) => k != SecurityManager.SPARK_AUTH_SECRET_CONF }
      .toMap

  /** Reads spark.kubernetes.executor.podTemplateFile: a local path, a file: URI or a Hadoop URI. */
  def readPodTemplate(path: String, conf: SparkConf): String = {
    val uri = try new URI(path) catch { case _: Exception => null }
    val scheme = Option(uri).flatMap(u => Option(u.getScheme)).getOrElse("")
    val bytes: Array[Byte] =
      if (scheme.isEmpty || scheme == "file" || scheme.length == 1 /* C:\ */) {
        val p = if (scheme == "file") Paths.get(uri) else Paths.get(path)
        if (Files.size(p) > MaxPodTemplateBytes) {
          throw new SparkException(s"${K8sKeys.PodTemplateFile}: $path is larger than " +
            s"$MaxPodTemplateBytes bytes")
        }
        Files.readAllBytes(p)
      } else {
        val hPath = new org.apache.hadoop.fs.Path(path)
        val fs = hPath.getFileSystem(SparkHadoopUtil.get.newConfiguration(conf))
        if (fs.getFileStatus(hPath).getLen > MaxPodTemplateBytes) {
          throw new SparkException(s"${K8sKeys.PodTemplateFile}: $path is larger than " +
            s"$MaxPodTemplateBytes bytes")
        }
        val in = fs.open(hPath)
        try in.readAllBytes() finally in.close()
      }
    new String(bytes, StandardCharsets.UTF_8)
  }

  private def withPrefix(conf: SparkConf, prefix: String): Map[String, String] =
    conf.getAllWithPrefix(prefix).toMap

  /**
   * The spark.kubernetes.* keys Spark's Kubernetes backend honours for executors, and every other
   * spark.kubernetes.* key in `other`. Driver credentials (spark.kubernetes.authenticate.*) are
   * never sent.
   */
  def kubernetes(conf: SparkConf, readFile: String => String): KubernetesSettings = {
    import K8sKeys._
    val b = KubernetesSettings.newBuilder()
      .setNamespace(conf.get(Namespace, "default"))
      .setImagePullPolicy(conf.get(PullPolicy, "IfNotPresent"))
    conf.getOption(ExecutorImage).orElse(conf.getOption(Image)).foreach(b.setImage)
    conf.getOption(PullSecrets).toSeq
      .flatMap(_.split(",").map(_.trim).filter(_.nonEmpty))
      .foreach(b.addImagePullSecrets)
    // Spark's executors fall back to the driver's service account.
    conf.getOption(ExecutorServiceAccount).orElse(conf.getOption(DriverServiceAccount))
      .foreach(b.setServiceAccount)
    b.putAllNodeSelector(
      (withPrefix(conf, NodeSelectorPrefix) ++ withPrefix(conf, ExecutorNodeSelectorPrefix)).asJava)
    conf.getOption(ExecutorSchedulerName).orElse(conf.getOption(SchedulerName))
      .foreach(b.setSchedulerName)
    conf.getOption(PodTemplateFile).filter(_.trim.nonEmpty).foreach { path =>
      val yaml = try readFile(path.trim) catch {
        case e: SparkException => throw e
        case e: Exception =>
          throw new SparkException(s"Cannot read $PodTemplateFile '$path': $e", e)
      }
      b.setPodTemplateYaml(yaml)
    }
    conf.getOption(RequestCores).foreach(b.setRequestCores)
    conf.getOption(LimitCores).foreach(b.setLimitCores)
    conf.getOption(DriverPodName).foreach(b.setDriverPodName)
    // driver_pod_uid stays empty: the driver does not know it without a Kubernetes client.

    val consumedKeys = Set(Namespace, Image, ExecutorImage, PullPolicy, PullSecrets,
      ExecutorSchedulerName, SchedulerName, PodTemplateFile, RequestCores, LimitCores,
      DriverPodName)
    val consumedPrefixes = Seq(AuthPrefix, NodeSelectorPrefix, ExecutorNodeSelectorPrefix,
      LabelPrefix, AnnotationPrefix)
    conf.getAll.foreach { case (k, v) =>
      if (k.startsWith(Prefix) && !consumedKeys(k) && !consumedPrefixes.exists(k.startsWith)) {
        b.putOther(k, v)
      }
    }
    b.build()
  }

  /** The spark.stoker.resize.* keys. */
  object ResizeKeys {
    /** Replace executors that ran out of memory by bigger ones (default true). */
    val Enabled = "spark.stoker.resize.enabled"
    /** Each growth multiplies the executor's memory by this (default 1.5; above 1). */
    val Factor = "spark.stoker.resize.factor"
    /** The most memory (heap + overhead) one executor may grow to, e.g. 8g (default: four
     *  times the largest profile's, bounded by the server). */
    val MaxMemory = "spark.stoker.resize.maxMemory"
    /** The sizes a run ends with are where the next run of the same key starts (default: the
     *  application name; empty: nothing remembered). */
    val SizingKey = "spark.stoker.sizing.key"
  }

  val DefaultResizeFactor = 1.5

  /**
   * spark.stoker.resize.*: values that are not a boolean, a number or a size are refused here,
   * naming the key; the server refuses a factor not above 1 and a ceiling below the executors'
   * memory, naming the key too.
   */
  def resizePolicy(conf: SparkConf): ResizePolicy = {
    import ResizeKeys._
    def bad(key: String, value: String, what: String): Nothing =
      throw new SparkException(s"$key: '$value' is not $what")
    val enabled = conf.getOption(Enabled).forall { v =>
      v.trim.toLowerCase(java.util.Locale.ROOT) match {
        case "true" => true
        case "false" => false
        case _ => bad(Enabled, v, "true or false")
      }
    }
    val factor = conf.getOption(Factor).map { v =>
      try v.trim.toDouble catch { case _: NumberFormatException => bad(Factor, v, "a number") }
    }.getOrElse(DefaultResizeFactor)
    val maxMemoryMiB = conf.getOption(MaxMemory).map { v =>
      val mib = try JavaUtils.byteStringAsMb(v.trim) catch {
        case _: NumberFormatException | _: IllegalArgumentException =>
          bad(MaxMemory, v, "a memory size such as 8g or 8192m")
      }
      if (mib <= 0) bad(MaxMemory, v, "a positive memory size")
      mib
    }.getOrElse(0L)
    val sizingKey = conf.getOption(SizingKey).getOrElse(conf.get("spark.app.name", "")).trim
    ResizePolicy.newBuilder()
      .setEnabled(enabled)
      .setFactor(factor)
      .setMaxMemoryMib(maxMemoryMiB)
      .setSizingKey(sizingKey)
      .build()
  }

  /** `spark.stoker.queue`: the fair-share queue the application asks for (stoker serve --queues). */
  val QueueKey = "spark.stoker.queue"

  /**
   * What stoker's fair share needs at registration: the queue asked for (empty: the server's
   * rules decide) and spark.dynamicAllocation.minExecutors when dynamic allocation is on (0
   * otherwise), admitted before any sharing.
   */
  def admission(conf: SparkConf): (String, Int) = {
    val queue = conf.get(QueueKey, "").trim
    val min =
      if (Utils.isDynamicAllocationEnabled(conf)) math.max(0, conf.get(DYN_ALLOCATION_MIN_EXECUTORS))
      else 0
    (queue, min)
  }

  /** spark.executor.maxNumFailures (Spark's default rule) and failuresValidityInterval. */
  def failurePolicy(conf: SparkConf): FailurePolicy = {
    val max = ExecutorFailureTracker.maxNumExecutorFailures(conf)
    FailurePolicy.newBuilder()
      .setMaxFailures(math.max(0, max))
      .setValidityIntervalMs(
        math.max(0L, conf.get(EXECUTOR_ATTEMPT_FAILURE_VALIDITY_INTERVAL_MS).getOrElse(0L)))
      .build()
  }

  /**
   * The whole template.
   *
   * @param executorEnvs the SparkContext's executorEnvs (spark.executorEnv.* and Spark's own)
   * @param authSecret   the authentication secret when spark.authenticate is on
   * @param profiles     one entry per resource profile the driver knows
   * @param readFile     reads the pod template file (see [[readPodTemplate]])
   */
  def build(
      conf: SparkConf,
      appId: String,
      sparkUser: String,
      executorEnvs: Map[String, String],
      authSecret: Option[String],
      profiles: Seq[ProtoProfile],
      readFile: String => String): ExecutorTemplate = {
    val b = ExecutorTemplate.newBuilder()
      .setDriverUrl(driverUrl(conf))
      .setSparkVersion(SPARK_VERSION)
      .setSparkUser(sparkUser)
      .addAllProfiles(profiles.sortBy(_.getId).asJava)
      .putAllEnvironment((executorEnvs + ("SPARK_USER" -> sparkUser)).asJava)
      .addAllJavaOptions(javaOptions(conf, appId).asJava)
      .putAllStartupConf(startupConf(conf).asJava)
      .putAllLabels(withPrefix(conf, K8sKeys.LabelPrefix).asJava)
      .putAllAnnotations(withPrefix(conf, K8sKeys.AnnotationPrefix).map { case (k, v) =>
        (k, Utils.substituteAppId(v, appId))
      }.asJava)
      .setKubernetes(kubernetes(conf, readFile))
      .setResize(resizePolicy(conf))
    conf.get(EXECUTOR_CLASS_PATH).foreach(b.setExtraClassPath)
    authSecret.filter(_ != null).foreach(b.setAuthSecret)
    b.build()
  }

  /**
   * The secret to give executors: Spark's shared secret when authentication is on and the
   * executors are not told to read it from a file of their own.
   */
  def authSecret(conf: SparkConf, securityManager: SecurityManager): Option[String] =
    if (securityManager.isAuthenticationEnabled() && conf.get(AUTH_SECRET_FILE_EXECUTOR).isEmpty) {
      Option(securityManager.getSecretKey())
    } else {
      None
    }
}
