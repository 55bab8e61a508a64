/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import org.apache.spark.SparkConf

/**
 * What stoker does with every `spark.kubernetes.*` key of the Spark version the plugin is built
 * against (plus `spark.executorEnv.*`): one [[KeyCoverage.Row]] per key or key pattern.
 *
 * `KeyCoverageTest` enumerates the keys from Spark's own jar (the ConfigEntry fields and the
 * prefix constants of `org.apache.spark.deploy.k8s.Config`, the `spark.kubernetes.*` entries
 * Spark registers, and every `spark.kubernetes.` literal in Spark's Kubernetes and core jars) and
 * fails while one of them has no row here; it proves each row the way [[KeyCoverage.Proof]]
 * says. `docs/spark-kubernetes-keys.md` is generated from these rows ([[markdown]]); the test
 * fails when the committed file differs.
 *
 * The warnings (and, with `spark.stoker.strictConf=true`, refusals) that the driver sends for
 * keys stoker does not honour come from the [[Refused]] rows: [[unsupportedKeys]].
 */
private[spark] object KeyCoverage {

  /** The Spark version the rows were checked against (the test compares it with the jar's). */
  val SparkVersion = "4.2.0"

  sealed abstract class Status(val name: String, val meaning: String)
  /** Spark's KubernetesExecutorBuilder (run by the plugin in the driver) or the plugin puts it
   *  into the executor pod or the objects sent with it. */
  case object Honoured extends Status("honoured",
    "Spark's own `KubernetesExecutorBuilder`, run by the plugin in the driver, or the plugin " +
      "itself puts it into the executor pod (or the objects sent with it) as Spark would")
  /** stoker itself does what the key asks, from the value the plugin sends. */
  case object ByStoker extends Status("honoured by stoker",
    "stoker itself does what the key asks, from the value the plugin sends")
  /** A knob of Spark's own allocator or pod watch: stoker's own behaviour does that job. */
  case object Replaced extends Status("replaced by stoker",
    "tunes Spark's own allocator, pod watch or API client; stoker's own behaviour does that " +
      "job, so the key has no effect and is not warned about")
  /** Not honoured: a driver warning naming the key, a refusal under strictConf. */
  case object Refused extends Status("not honoured: warned, refused if strict",
    "stoker does not do what the key asks: when it is set the driver logs a warning naming " +
      "it, and with `spark.stoker.strictConf=true` the registration is refused with " +
      "`INVALID_ARGUMENT` naming it")
  /** Read only on the driver side (submission, the driver pod, the driver's own client). */
  case object DriverOnly extends Status("driver side",
    "concerns the driver, its pod or spark-submit, not executor pods")

  val Statuses: Seq[Status] = Seq(Honoured, ByStoker, Replaced, Refused, DriverOnly)

  /** How `KeyCoverageTest` proves a row. */
  sealed trait Proof
  /**
   * Building the executor pod through the plugin's real path (StokerSparkPods, offline) with
   * `context ++ set` gives a different pod, claim or executor ConfigMap than with `context`
   * alone. A value may name `@TEMPLATE@`: the test's pod template file.
   */
  final case class PodDiffers(set: Seq[(String, String)],
      context: Seq[(String, String)] = Nil) extends Proof
  /** stoker's Rust code (a file of this repository) reads the setting: it names `literal`. */
  final case class StokerReads(file: String, literal: String) extends Proof
  /** [[unsupportedKeys]] names the key when `set` is applied (the test also checks that the
   *  pod does not change where that is meaningful). */
  final case class Warned(set: Seq[(String, String)]) extends Proof
  /** The pod is the same whatever the key's value (the test tries several values). */
  case object PodUnchanged extends Proof
  /** Cannot be observed offline; says why. */
  final case class Unobservable(reason: String) extends Proof

  /**
   * One key (or pattern: `[name]`, `[type]` stand for any text) and what stoker does with it.
   * `refusedWhen` (only for [[Refused]]): whether the conf triggers the warning.
   */
  final case class Row(key: String, status: Status, why: String, proof: Proof,
      refusedWhen: SparkConf => Boolean = _ => false) {
    /** The part of the key before its first placeholder (the whole key when there is none). */
    def prefix: String = key.indexOf('[') match {
      case -1 => key
      case i => key.substring(0, i)
    }
    def isPattern: Boolean = key.contains('[')
    def matches(k: String): Boolean = if (isPattern) k.startsWith(prefix) else k == key
  }

  private val K = "spark.kubernetes."
  private val E = "spark.kubernetes.executor."
  private val V = "spark.kubernetes.executor.volumes."
  private val Decom = Seq("spark.decommission.enabled" -> "true")
  private val OnDemand = Seq(
    V + "persistentVolumeClaim.data.mount.path" -> "/data",
    V + "persistentVolumeClaim.data.options.claimName" -> "OnDemand",
    V + "persistentVolumeClaim.data.options.storageClass" -> "standard",
    V + "persistentVolumeClaim.data.options.sizeLimit" -> "1Gi")
  private val Template = Seq(E + "podTemplateFile" -> "@TEMPLATE@")

  private def isTrue(conf: SparkConf, key: String) =
    conf.getOption(key).exists(_.trim.equalsIgnoreCase("true"))
  private def isSet(key: String): SparkConf => Boolean = _.contains(key)

  private val Roll = "read by Spark's ExecutorRollPlugin, which works only under Spark's own " +
    "Kubernetes scheduler backend (it disables itself with a warning under stoker's)"
  private val Resize = "read by Spark's executor resize plugins, which work only under Spark's " +
    "own Kubernetes scheduler backend (they disable themselves under stoker's)"
  private val Watch = "tunes Spark's per-driver pod watch and polling; stoker's one shared " +
    "watch reports every executor's fate as it happens"
  private val Client = "the driver's own Kubernetes client, which a stoker driver does not use"
  private val Submit = "spark-submit's cluster mode (submission, driver pod and its service); " +
    "a stoker driver runs in client mode"
  private val DriverPod = "the driver pod, which spark-submit's cluster mode builds; stoker " +
    "builds only executor pods"

  /** The volume options Spark 4.2 reads, per volume type, with a sample and a base volume. */
  private val VolumeTypes: Seq[(String, Seq[(String, String)], Seq[(String, String)])] = Seq(
    ("hostPath", Seq("options.path" -> "/srv/b", "options.type" -> "Directory"),
      Seq("mount.path" -> "/v", "options.path" -> "/srv/a")),
    ("emptyDir", Seq("options.medium" -> "Memory", "options.sizeLimit" -> "2Gi"),
      Seq("mount.path" -> "/v")),
    ("nfs", Seq("options.path" -> "/exports/b", "options.server" -> "nfs.example"),
      Seq("mount.path" -> "/v", "options.path" -> "/exports/a", "options.server" -> "nfs.a")),
    ("persistentVolumeClaim", Seq("options.claimName" -> "claim-b",
      "options.storageClass" -> "fast", "options.sizeLimit" -> "5Gi",
      "label.[name]" -> "tier=gold", "annotation.[name]" -> "note=gold"),
      Seq("mount.path" -> "/v", "options.claimName" -> "OnDemand",
        "options.storageClass" -> "standard", "options.sizeLimit" -> "1Gi")))
  private val MountOptions = Seq("mount.path" -> "/w", "mount.subPath" -> "sub",
    "mount.subPathExpr" -> "$(SPARK_EXECUTOR_POD_NAME)", "mount.readOnly" -> "true")

  private def volumeRows: Seq[Row] = VolumeTypes.flatMap { case (tpe, options, base) =>
    val context = base.map { case (k, v) => s"$V$tpe.v.$k" -> v }
    (MountOptions ++ options).map { case (option, sample) =>
      val set = option match {
        case o if o.endsWith("[name]") =>
          val Array(n, value) = sample.split("=", 2)
          Seq(s"$V$tpe.v.${o.stripSuffix("[name]")}$n" -> value)
        case o => Seq(s"$V$tpe.v.$o" -> sample)
      }
      val how = option match {
        case "mount.path" => "the volume and its mount in the executor container (" +
          "`spark-local-dir-*` volumes become local dirs); a volume without it is refused by " +
          "name (`mount.path: missing`), as is an unknown volume type"
        case o if o.startsWith("mount.") => "the executor container's volume mount"
        case o if tpe == "persistentVolumeClaim" && o.startsWith("options.claimName") =>
          "the claim; `OnDemand`: stoker creates one claim per executor after its pod " +
            "(`<pod name>-pvc-<n>`), `SPARK_EXECUTOR_ID` in the name becomes the executor id"
        case o if tpe == "persistentVolumeClaim" =>
          "the on-demand claim Spark's builder returns, which stoker creates per executor"
        case _ => "the pod's volume"
      }
      Row(s"$V$tpe.[name].$option", Honoured, how, PodDiffers(set, context))
    }
  }

  private val PlaceholderFilled = "`{{EXECUTOR_ID}}` in a value becomes each executor's id " +
    "(Spark substitutes the placeholder id, stoker the executor's)"

  /** Every row, in table order. */
  lazy val rows: Seq[Row] = Seq(
    // ---- The executor pod: Spark's builder. -------------------------------------------------
    Row(K + "container.image", Honoured, "the executor container's image (or stoker's " +
      "`--kube-image` when neither image key is set)", PodDiffers(Seq(K + "container.image" -> "img:2"))),
    Row(E + "container.image", Honoured, "the executor container's image",
      PodDiffers(Seq(E + "container.image" -> "exec:2"))),
    Row(K + "container.image.pullPolicy", Honoured, "the container's imagePullPolicy",
      PodDiffers(Seq(K + "container.image.pullPolicy" -> "Always"))),
    Row(K + "container.image.pullSecrets", Honoured, "the pod's imagePullSecrets",
      PodDiffers(Seq(K + "container.image.pullSecrets" -> "regcred"))),
    Row(K + "authenticate.executor.serviceAccountName", Honoured, "the pod's serviceAccountName",
      PodDiffers(Seq(K + "authenticate.executor.serviceAccountName" -> "exec-sa"))),
    Row(K + "authenticate.driver.serviceAccountName", Honoured, "the executors' " +
      "serviceAccountName when the executor key is not set (Spark's fallback); the driver pod's " +
      "account otherwise", PodDiffers(Seq(K + "authenticate.driver.serviceAccountName" -> "drv-sa"))),
    Row(E + "request.cores", Honoured, "the executor container's CPU request",
      PodDiffers(Seq(E + "request.cores" -> "500m"))),
    Row(E + "limit.cores", Honoured, "the executor container's CPU limit",
      PodDiffers(Seq(E + "limit.cores" -> "2"))),
    Row(K + "memoryOverheadFactor", Honoured, "the container's memory request and limit",
      PodDiffers(Seq(K + "memoryOverheadFactor" -> "0.5"))),
    Row(E + "scheduler.name", Honoured, "the pod's schedulerName",
      PodDiffers(Seq(E + "scheduler.name" -> "volcano"))),
    Row(K + "scheduler.name", Honoured, "the pod's schedulerName when the executor key is not set",
      PodDiffers(Seq(K + "scheduler.name" -> "volcano"))),
    Row(E + "podTemplateFile", Honoured, "the pod template Spark's builder merges (read by " +
      "the driver)", PodDiffers(Template)),
    Row(E + "podTemplateContainerName", Honoured, "which template container becomes the " +
      "executor container", PodDiffers(Seq(E + "podTemplateContainerName" -> "spark-executor"),
      Template)),
    Row(E + "pod.featureSteps", Honoured, "extra feature steps run by Spark's builder in the " +
      "driver (their classes must be on the driver's class path)",
      PodDiffers(Seq(E + "pod.featureSteps" -> "org.apache.spark.scheduler.cluster.stoker.KeyCoverageSampleStep"))),
    Row(E + "pod.excludedFeatureSteps", Honoured, "feature steps Spark's builder leaves out",
      PodDiffers(Seq(E + "pod.excludedFeatureSteps" ->
        "org.apache.spark.deploy.k8s.features.LocalDirsFeatureStep"))),
    Row(E + "label.[name]", Honoured, "the pod's labels (stoker adds its own; Spark's reserved " +
      "labels cannot be set). " + PlaceholderFilled,
      PodDiffers(Seq(E + "label.team" -> "data"))),
    Row(E + "annotation.[name]", Honoured, "the pod's annotations. " + PlaceholderFilled,
      PodDiffers(Seq(E + "annotation.note" -> "x"))),
    Row(K + "node.selector.[name]", Honoured, "the pod's nodeSelector",
      PodDiffers(Seq(K + "node.selector.disk" -> "ssd"))),
    Row(E + "node.selector.[name]", Honoured, "the pod's nodeSelector (executors only)",
      PodDiffers(Seq(E + "node.selector.pool" -> "exec"))),
    Row(E + "secrets.[name]", Honoured, "a secret volume mounted at the value",
      PodDiffers(Seq(E + "secrets.s1" -> "/mnt/s1"))),
    Row(E + "secretKeyRef.[name]", Honoured, "an environment variable from a secret key; a " +
      "value that is not `<secret>:<key>` is refused by name",
      PodDiffers(Seq(E + "secretKeyRef.MY_SECRET" -> "s1:k"))),
    Row("spark.executorEnv.[name]", Honoured, "an environment variable of the executor container",
      PodDiffers(Seq("spark.executorEnv.REGION" -> "eu"))),
    Row(K + "local.dirs.tmpfs", Honoured, "local dirs on memory-backed emptyDirs",
      PodDiffers(Seq(K + "local.dirs.tmpfs" -> "true"))),
    Row(K + "decommission.script", Honoured, "the executor container's preStop hook (with " +
      "`spark.decommission.enabled=true`)", PodDiffers(Seq(K + "decommission.script" -> "/opt/x.sh"), Decom)),
    Row(E + "terminationGracePeriodSeconds", Honoured, "the pod's terminationGracePeriodSeconds",
      PodDiffers(Seq(E + "terminationGracePeriodSeconds" -> "77"))),
    Row(E + "useDriverPodIP", Honoured, "the driver URL the executors get (the driver's bind " +
      "address)", PodDiffers(Seq(E + "useDriverPodIP" -> "true"),
      Seq("spark.driver.bindAddress" -> "10.9.9.9"))),
    Row(E + "disableConfigMap", Honoured, "no executor ConfigMap: the pod does not mount it and " +
      "the plugin sends none", PodDiffers(Seq(E + "disableConfigMap" -> "true"))),
    Row(K + "configMap.maxSize", Honoured, "caps the SPARK_CONF_DIR files put into the executor " +
      "ConfigMap the plugin builds (as Spark's backend does)", Unobservable("only files in the " +
      "driver's SPARK_CONF_DIR count, and the test JVM has none")),
    Row(E + "hadoopConfigMapName", Honoured, "the Hadoop configuration ConfigMap mounted at " +
      "HADOOP_CONF_DIR (Spark's internal key, which spark-submit's cluster mode sets)",
      PodDiffers(Seq(E + "hadoopConfigMapName" -> "hadoop-conf"))),
    Row(K + "allocation.recoveryMode.enabled", Honoured, "`true`: every executor runs " +
      "`spark.task.cpus` cores' worth of tasks (one task), as Spark's recovery-mode executors; " +
      "Spark's switch into that mode after an OOM kill is replaced by stoker's resizing",
      PodDiffers(Seq(K + "allocation.recoveryMode.enabled" -> "true"),
        Seq("spark.executor.cores" -> "4"))),
    Row(K + "legacy.useReadWriteOnceAccessMode", Honoured, "on-demand claims' access mode",
      PodDiffers(Seq(K + "legacy.useReadWriteOnceAccessMode" -> "true"), OnDemand)),
    Row(E + "podNamePrefix", ByStoker, "Spark's builder names the pod `<prefix>-exec-<id>`; " +
      "stoker replaces that by its own name (`<app>-<8 hex>-exec-<id>`, unique across " +
      "applications, what its pod index and adoption rely on)",
      StokerReads("crates/stoker-k8s/src/spark_pod.rs", "stoker_pod: pod::pod_name")),
    Row(K + "namespace", ByStoker, "the namespace of the pods, claims and ConfigMap",
      StokerReads("crates/stoker-k8s/src/pod.rs", "pub fn namespace_of")),
    Row(K + "driver.pod.name", ByStoker, "executor pods (and on-demand claims, ConfigMap) are " +
      "owned by the driver pod", StokerReads("crates/stoker-k8s/src/writer.rs",
        "driver_pod_name")),
    Row(K + "driver.ownPersistentVolumeClaim", ByStoker, "on-demand claims are owned by the " +
      "driver pod (default) or by their executor pod",
      StokerReads("crates/stoker-k8s/src/spark_pod.rs", "spark.kubernetes.driver.ownPersistentVolumeClaim")),
    Row(K + "driver.reusePersistentVolumeClaim", ByStoker, "`true` (Spark's default) with " +
      "claims the driver pod owns: a new executor's OnDemand claim is replaced by a claim of " +
      "the same storage class and size that no live executor mounts, as Spark's allocator does " +
      "(the replacement of a lost executor finds its shuffle files there with " +
      "KubernetesLocalDiskShuffleDataIO)",
      StokerReads("crates/stoker-k8s/src/spark_pod.rs",
        "spark.kubernetes.driver.reusePersistentVolumeClaim")),
    Row(K + "driver.waitToReusePersistentVolumeClaim", ByStoker, "`true` (with " +
      "ownPersistentVolumeClaim, reusePersistentVolumeClaim and a driver pod): once the " +
      "application has as many on-demand claims as Spark's allocator allows " +
      "(spark.dynamicAllocation.maxExecutors, or spark.executor.instances) and none is free, a " +
      "new executor waits for one instead of getting new claims; the driver is told once",
      StokerReads("crates/stoker-k8s/src/resources.rs",
        "spark.kubernetes.driver.waitToReusePersistentVolumeClaim")),
    Row(E + "decommissionLabel", ByStoker, "when the driver decommissions executors (dynamic " +
      "allocation, a fair-share reclaim), stoker puts this label on their pods, as Spark's " +
      "backend does", StokerReads("crates/stoker-k8s/src/decommission.rs",
        "spark.kubernetes.executor.decommissionLabel")),
    Row(E + "decommissionLabelValue", ByStoker, "the value of that label (default: empty)",
      StokerReads("crates/stoker-k8s/src/decommission.rs",
        "spark.kubernetes.executor.decommissionLabelValue")),
    Row(E + "deleteOnTermination", ByStoker, "`false`: the pods of executors that exit on their " +
      "own are kept", StokerReads("crates/stoker-k8s/src/pod.rs",
        "spark.kubernetes.executor.deleteOnTermination")),
    // ---- Not honoured. ------------------------------------------------------------------------
    Row(E + "podDeletionCost", Refused,
      "stoker creates bare pods (no Deployment): no deletion cost is applied",
      Warned(Seq(E + "podDeletionCost" -> "5")), isSet(E + "podDeletionCost")),
    Row(K + "allocation.pods.allocator", Refused,
      "stoker creates the pods itself; allocators other than `direct` are not used",
      Warned(Seq(K + "allocation.pods.allocator" -> "statefulset")),
      c => c.getOption(K + "allocation.pods.allocator").exists(_.trim != "direct")),
    Row(K + "allocation.maximum", Refused, "stoker does not cap the number of executor pods " +
      "created over an application's life (spark.executor.maxNumFailures bounds replacements)",
      Warned(Seq(K + "allocation.maximum" -> "10")), isSet(K + "allocation.maximum")),
    Row(E + "rollInterval", Refused, Roll, Warned(Seq(E + "rollInterval" -> "10m")),
      isSet(E + "rollInterval")),
    Row(E + "rollPolicy", Refused, Roll, Warned(Seq(E + "rollPolicy" -> "ID")),
      isSet(E + "rollPolicy")),
    Row(E + "minTasksPerExecutorBeforeRolling", Refused, Roll,
      Warned(Seq(E + "minTasksPerExecutorBeforeRolling" -> "3")),
      isSet(E + "minTasksPerExecutorBeforeRolling")),
    Row(E + "resizeInterval", Refused, Resize, Warned(Seq(E + "resizeInterval" -> "1m")),
      isSet(E + "resizeInterval")),
    Row(E + "resizeThreshold", Refused, Resize, Warned(Seq(E + "resizeThreshold" -> "0.8")),
      isSet(E + "resizeThreshold")),
    Row(E + "resizeFactor", Refused, Resize, Warned(Seq(E + "resizeFactor" -> "0.2")),
      isSet(E + "resizeFactor")),
    Row(E + "pvc.resizeInterval", Refused, Resize, Warned(Seq(E + "pvc.resizeInterval" -> "10m")),
      isSet(E + "pvc.resizeInterval")),
    Row(E + "pvc.resizeThreshold", Refused, Resize,
      Warned(Seq(E + "pvc.resizeThreshold" -> "0.7")), isSet(E + "pvc.resizeThreshold")),
    Row(E + "pvc.resizeFactor", Refused, Resize, Warned(Seq(E + "pvc.resizeFactor" -> "2")),
      isSet(E + "pvc.resizeFactor")),
    // ---- Replaced by stoker's own behaviour. --------------------------------------------------
    Row(K + "allocation.batch.size", Replaced, "stoker creates pods as fast as the API server " +
      "allows (`--kube-create-concurrency`, `--kube-qps`), fairly across applications", PodUnchanged),
    Row(K + "allocation.batch.delay", Replaced, "as allocation.batch.size", PodUnchanged),
    Row(K + "allocation.maxPendingPods", Replaced, "pending pods are bounded by stoker's own " +
      "limits and admission, not per driver", PodUnchanged),
    Row(K + "allocation.maxPendingPodsPerRp", Replaced, "as allocation.maxPendingPods", PodUnchanged),
    Row(K + "allocation.executor.timeout", Replaced, "stoker's start timeout removes executors " +
      "whose pods do not start", PodUnchanged),
    Row(K + "allocation.driver.readinessTimeout", Replaced, "Spark waits for its driver pod to " +
      "be ready; a stoker driver registers only once it runs", PodUnchanged),
    Row(E + "apiPollingInterval", Replaced, Watch, PodUnchanged),
    Row(E + "enableApiPolling", Replaced, Watch, PodUnchanged),
    Row(E + "enableApiWatcher", Replaced, Watch, PodUnchanged),
    Row(E + "enablePollingWithResourceVersion", Replaced, Watch, PodUnchanged),
    Row(E + "eventProcessingInterval", Replaced, Watch, PodUnchanged),
    Row(E + "missingPodDetectDelta", Replaced, Watch, PodUnchanged),
    Row(E + "deletedExecutorsCacheTimeout", Replaced, Watch, PodUnchanged),
    Row(K + "executorSnapshotsSubscribersShutdownGracePeriod", Replaced, Watch, PodUnchanged),
    Row(E + "checkAllContainers", Replaced, "stoker judges an executor by its executor " +
      "container (annotation `stoker.dev/container`): a sidecar that exits does not end the " +
      "executor, where Spark (default true) would", PodUnchanged),
    Row(K + "dynamicAllocation.deleteGracePeriod", Replaced, "stoker deletes the pods of " +
      "executors Spark kills or scales down", PodUnchanged),
    Row(K + "driver.master", Replaced, Client, PodUnchanged),
    Row(K + "driver.requestTimeout", Replaced, Client + "; `spark.stoker.rpc.timeout` bounds " +
      "its calls to stoker", PodUnchanged),
    Row(K + "driver.connectionTimeout", Replaced, Client, PodUnchanged),
    Row(K + "context", Replaced, Client, PodUnchanged),
    Row(K + "trust.certificates", Replaced, Client, PodUnchanged),
    Row(K + "authenticate.[name]", Replaced, Client + " (client-mode credentials; never sent to " +
      "stoker: a driver authenticates to stoker with its own token)", PodUnchanged),
    // ---- Driver side. -------------------------------------------------------------------------
    Row(K + "authenticate.driver.[name]", DriverOnly, "credentials of the driver pod's " +
      "Kubernetes client in cluster mode; never sent to stoker", PodUnchanged),
    Row(K + "authenticate.driver.mounted.[name]", DriverOnly, "credentials mounted into the " +
      "driver pod in cluster mode; never sent to stoker", PodUnchanged),
    Row(K + "authenticate.submission.[name]", DriverOnly, "spark-submit's credentials in " +
      "cluster mode; never sent to stoker", PodUnchanged),
    Row(K + "driver.container.image", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.podTemplateFile", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.podTemplateContainerName", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.pod.featureSteps", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.pod.excludedFeatureSteps", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.request.cores", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.limit.cores", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.scheduler.name", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.resourceNamePrefix", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.label.[name]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.annotation.[name]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.node.selector.[name]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.secrets.[name]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.secretKeyRef.[name]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.volumes.[type].[name].[option]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driverEnv.[name]", DriverOnly, DriverPod, PodUnchanged),
    Row(K + "driver.service.label.[name]", DriverOnly, Submit, PodUnchanged),
    Row(K + "driver.service.annotation.[name]", DriverOnly, Submit, PodUnchanged),
    Row(K + "driver.service.deleteOnTermination", DriverOnly, Submit, PodUnchanged),
    Row(K + "driver.service.ipFamilyPolicy", DriverOnly, Submit, PodUnchanged),
    Row(K + "driver.service.ipFamilies", DriverOnly, Submit, PodUnchanged),
    Row(K + "driver.annotateExitException", DriverOnly, "annotates the driver pod", PodUnchanged),
    Row(K + "submission.waitAppCompletion", DriverOnly, Submit, PodUnchanged),
    Row(K + "submission.requestTimeout", DriverOnly, Submit, PodUnchanged),
    Row(K + "submission.connectionTimeout", DriverOnly, Submit, PodUnchanged),
    Row(K + "report.interval", DriverOnly, Submit, PodUnchanged),
    Row(K + "submitInDriver", DriverOnly, Submit + " (internal)", PodUnchanged),
    Row(K + "setSubmitTimeInDriver", DriverOnly, Submit + " (internal)", PodUnchanged),
    Row(K + "resource.type", DriverOnly, Submit + " (internal; does not change the executor " +
      "pod)", PodUnchanged),
    Row(K + "file.upload.path", DriverOnly, Submit, PodUnchanged),
    Row(K + "jars.avoidDownloadSchemes", DriverOnly, Submit, PodUnchanged),
    Row(K + "appKillPodDeletionGracePeriod", DriverOnly, "spark-submit --kill", PodUnchanged),
    Row(K + "hadoop.configMapName", DriverOnly, "spark-submit's cluster mode mounts it on the " +
      "driver and passes it to executors as `spark.kubernetes.executor.hadoopConfigMapName`; " +
      "a client-mode driver must set that key itself", PodUnchanged),
    Row(K + "kerberos.krb5.path", DriverOnly, Submit + "; executors get delegation tokens " +
      "from the driver", PodUnchanged),
    Row(K + "kerberos.krb5.configMapName", DriverOnly, Submit + "; executors get delegation " +
      "tokens from the driver", PodUnchanged),
    Row(K + "kerberos.tokenSecret.name", DriverOnly, Submit + "; executors get delegation " +
      "tokens from the driver", PodUnchanged),
    Row(K + "kerberos.tokenSecret.itemKey", DriverOnly, Submit + "; executors get delegation " +
      "tokens from the driver", PodUnchanged),
    Row(K + "kerberos.dt-secret-name", DriverOnly, Submit + " (internal)", PodUnchanged),
    Row(K + "kerberos.dt-secret-key", DriverOnly, Submit + " (internal)", PodUnchanged),
    Row(K + "scheduler.volcano.podGroupTemplateFile", DriverOnly, "the PodGroup Spark's " +
      "VolcanoFeatureStep creates from the driver (cluster mode)", PodUnchanged),
    Row(K + "scheduler.volcano.podGroupTemplateJson", DriverOnly, "as podGroupTemplateFile",
      PodUnchanged)
  ) ++ volumeRows

  /** The rows of a status. */
  def rowsOf(status: Status): Seq[Row] = rows.filter(_.status == status)

  /** The row of a concrete key: the exact row, else the pattern with the longest prefix. */
  def rowFor(key: String): Option[Row] =
    rows.find(r => !r.isPattern && r.key == key)
      .orElse(rows.filter(r => r.isPattern && r.matches(key)).sortBy(-_.prefix.length).headOption)

  /**
   * Keys set in `conf` that stoker does not honour, with the reason: the [[Refused]] rows whose
   * condition holds. Sent with the registration; the backend warns, and refuses under
   * `spark.stoker.strictConf=true`.
   */
  def unsupportedKeys(conf: SparkConf): Map[String, String] =
    rowsOf(Refused).filter(_.refusedWhen(conf)).map(r => r.key -> r.why).toMap

  private def cell(s: String): String = s.replace("|", "\\|").replace("\n", " ")

  private def proofText(p: Proof): String = p match {
    case PodDiffers(set, context) =>
      val sets = set.map { case (k, v) => s"`$k=$v`" }.mkString(", ")
      val with_ = if (context.isEmpty) "" else s" (with ${context.map(_._1).mkString(", ")})"
      s"pod differs with $sets$with_"
    case StokerReads(file, _) => s"read by `$file`"
    case Warned(set) => s"warned with ${set.map { case (k, v) => s"`$k=$v`" }.mkString(", ")}"
    case PodUnchanged => "pod unchanged"
    case Unobservable(reason) => s"not checked offline: $reason"
  }

  /** The README key table, generated from [[rows]]. */
  def markdown: String = {
    val sb = new StringBuilder
    sb ++= "# Spark's `spark.kubernetes.*` keys under stoker\n\n"
    sb ++= "Generated by `KeyCoverageTest` from `spark-plugin/src/main/scala/org/apache/spark/" +
      "scheduler/cluster/stoker/KeyCoverage.scala`; do not edit (regenerate with\n" +
      "`cd spark-plugin && mvn -B -q test -Dtest=KeyCoverageTest -Dstoker.writeKeyTable=true`).\n\n"
    sb ++= s"Checked against **Spark $SparkVersion**: every `ConfigEntry` and prefix constant of " +
      "`org.apache.spark.deploy.k8s.Config`, every `spark.kubernetes.*` entry Spark registers " +
      "and every `spark.kubernetes.` string in Spark's Kubernetes and core jars has a row; the " +
      "test fails for a key without one. `[name]`, `[type]` stand for any text. The last column " +
      "says how the test proves the row: the executor pod built through the plugin's real path " +
      "(offline) differs from the one without the key, or does not change whatever its value, " +
      "or the plugin warns naming the key, or stoker's code reads it.\n\n"
    sb ++= "| status | meaning | keys |\n| --- | --- | --- |\n"
    Statuses.foreach { s =>
      sb ++= s"| ${s.name} | ${cell(s.meaning)} | ${rowsOf(s).size} |\n"
    }
    sb ++= "\nThe per-executor parts of the pod (name, hostname, `spark-exec-id`, " +
      "`SPARK_EXECUTOR_ID`, `{{EXECUTOR_ID}}` in the Java options, claim names) are filled in " +
      "by stoker; the test checks that no honoured key makes anything else differ between two " +
      "executors.\n\n"
    sb ++= "| key | status | how / why | checked |\n| --- | --- | --- | --- |\n"
    Statuses.foreach { s =>
      rowsOf(s).sortBy(_.key).foreach { r =>
        sb ++= s"| `${r.key}` | ${s.name} | ${cell(r.why)} | ${cell(proofText(r.proof))} |\n"
      }
    }
    sb.toString
  }
}
