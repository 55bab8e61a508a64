/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.util.concurrent.atomic.AtomicInteger

import io.fabric8.kubernetes.api.model.{HasMetadata, Pod, PodBuilder}
import io.fabric8.kubernetes.client.{Config, ConfigBuilder, KubernetesClient, KubernetesClientBuilder}
import io.fabric8.kubernetes.client.http.{BasicBuilder, HttpClient, HttpRequest, Interceptor}
import io.fabric8.kubernetes.client.utils.KubernetesSerialization

import org.apache.spark.{SecurityManager, SparkConf, SparkException}
import org.apache.spark.deploy.k8s.{Config => K8sConfig, Constants, KubernetesConf}
import org.apache.spark.deploy.k8s.submit.KubernetesClientUtils
import org.apache.spark.resource.ResourceProfile
import org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBuilder

/**
 * Lets Spark's own [[KubernetesExecutorBuilder]] build a resource profile's executor pod in the
 * driver, without any Kubernetes API server, and serializes it to JSON for stoker (see
 * [[StokerSparkPods]], which is what the scheduler backend calls).
 *
 * The pod is built for one placeholder executor id ([[PlaceholderExecutorId]]); stoker fills in
 * the per-executor parts (pod name, hostname, SPARK_EXECUTOR_ID, label spark-exec-id,
 * `{{EXECUTOR_ID}}` in the Java options, on-demand PVC names, owner references).
 *
 * What the builder needs (Spark 4.2.0, `buildFromFeatures(conf, secMgr, client, profile)`):
 *  - a KubernetesExecutorConf from `KubernetesConf.createExecutorConf(sparkConf, executorId,
 *    appId, driverPod = None, profile.id)`;
 *  - the driver's SecurityManager (only read for `_SPARK_AUTH_SECRET` when spark.authenticate
 *    is on and no executor secret file is configured);
 *  - a KubernetesClient, used only by `KubernetesUtils.loadPodFromTemplate` as
 *    `client.pods().load(file).item()`: local parsing, no request. With no pod template file the
 *    client is never touched; with one we pass [[offlineClient]], whose master URL is the
 *    unreachable 127.0.0.1:1 and which refuses every request before it is sent;
 *  - the ResourceProfile (cores, memory, custom resources).
 */
private[spark] object StokerExecutorPods {

  /**
   * The executor id the pods are built with. Lower-case letters only, so it is valid wherever
   * the real id goes (DNS label of the pod name, label value, env value, PVC name).
   */
  val PlaceholderExecutorId = "stokerexecid"

  /** Where the offline client "points": nothing listens on port 1, and no request is sent. */
  val OfflineMasterUrl = "https://127.0.0.1:1/"

  /** The executor pod of one resource profile, as Spark would create it, and its extra objects. */
  final case class ExecutorPodSpec(
      pod: Pod,
      podJson: String,
      /** Extra objects the builder returned (on-demand PVCs, ...), each as JSON. */
      resourcesJson: Seq[String],
      resources: Seq[HasMetadata])

  /**
   * Makes the executor pod name prefix stable for the application, as Spark's
   * KubernetesClusterManager does (without it every KubernetesConf draws a random one).
   */
  def ensurePodNamePrefix(conf: SparkConf): String = {
    conf.get(K8sConfig.KUBERNETES_EXECUTOR_POD_NAME_PREFIX).getOrElse {
      val prefix = KubernetesConf.getResourceNamePrefix(conf.get("spark.app.name", "spark"))
      conf.set(K8sConfig.KUBERNETES_EXECUTOR_POD_NAME_PREFIX, prefix)
      prefix
    }
  }

  /**
   * The executor ConfigMap every Spark-built pod mounts (`spark-exec-<hex>-conf-map`, the
   * volume `spark-conf-volume-exec`), built as KubernetesClusterSchedulerBackend's
   * setUpExecutorConfigMap builds it: the SPARK_CONF_DIR files plus spark.kubernetes.namespace,
   * labelled with the application id and the executor role. None when
   * spark.kubernetes.executor.disableConfigMap is true (the pods then do not mount it).
   */
  def executorConfigMapJson(conf: SparkConf, appId: String): Option[String] = {
    if (conf.get(K8sConfig.KUBERNETES_EXECUTOR_DISABLE_CONFIGMAP)) {
      None
    } else {
      val name = KubernetesClientUtils.configMapNameExecutor
      val resolved = Map(K8sConfig.KUBERNETES_NAMESPACE.key -> conf.get(K8sConfig.KUBERNETES_NAMESPACE))
      val files = KubernetesClientUtils.buildSparkConfDirFilesMap(name, conf, resolved) ++ resolved
      val labels = Map(Constants.SPARK_APP_ID_LABEL -> appId,
        Constants.SPARK_ROLE_LABEL -> Constants.SPARK_POD_EXECUTOR_ROLE)
      Some(toJson(KubernetesClientUtils.buildConfigMap(name, files, labels)))
    }
  }

  /** Counts and refuses every request: the builder must never talk to an API server. */
  final class RefuseRequests extends Interceptor {
    val attempts = new AtomicInteger(0)
    override def before(builder: BasicBuilder, request: HttpRequest,
        tags: Interceptor.RequestTags): Unit = {
      attempts.incrementAndGet()
      throw new IllegalStateException(
        s"stoker builds executor pods offline: refused ${request.method()} ${request.uri()}")
    }
  }

  /**
   * A fabric8 client for local parsing only: no kubeconfig, no service account, no environment
   * (Config.empty()), a master URL nothing listens on, and an interceptor that refuses requests.
   */
  def offlineClient(guard: Interceptor = new RefuseRequests,
      masterUrl: String = OfflineMasterUrl): KubernetesClient = {
    val config: Config = new ConfigBuilder(Config.empty())
      .withMasterUrl(masterUrl)
      .withConnectionTimeout(1000)
      .withRequestTimeout(1000)
      .withRequestRetryBackoffLimit(0)
      .build()
    new KubernetesClientBuilder()
      .withConfig(config)
      .withHttpClientBuilderConsumer((b: HttpClient.Builder) => {
        b.addOrReplaceInterceptor("stoker-offline", guard)
        ()
      })
      .build()
  }

  private lazy val serialization = new KubernetesSerialization()

  def toJson(o: AnyRef): String = serialization.asJson(o)

  /**
   * Builds `profile`'s executor pod with Spark's KubernetesExecutorBuilder. `conf` must carry a
   * stable spark.kubernetes.executor.podNamePrefix (see [[ensurePodNamePrefix]]).
   * `newClient` is called only when a pod template file is configured; the client is closed
   * before this returns.
   */
  def build(
      conf: SparkConf,
      appId: String,
      profile: ResourceProfile,
      secMgr: SecurityManager,
      executorId: String = PlaceholderExecutorId,
      newClient: () => KubernetesClient = () => offlineClient()): ExecutorPodSpec = {
    if (conf.get(K8sConfig.KUBERNETES_EXECUTOR_POD_NAME_PREFIX).isEmpty) {
      throw new SparkException(
        s"${K8sConfig.KUBERNETES_EXECUTOR_POD_NAME_PREFIX.key} must be set (ensurePodNamePrefix)")
    }
    val executorConf = KubernetesConf.createExecutorConf(conf, executorId, appId, None, profile.id)
    val client =
      if (conf.get(K8sConfig.KUBERNETES_EXECUTOR_PODTEMPLATE_FILE).isDefined) newClient() else null
    val spec = try {
      new KubernetesExecutorBuilder().buildFromFeatures(executorConf, secMgr, client, profile)
    } finally {
      if (client != null) client.close()
    }
    // Exactly as ExecutorPodsAllocator.requestNewExecutors: the Spark container goes last.
    val pod = new PodBuilder(spec.pod.pod)
      .editOrNewSpec()
      .addToContainers(spec.pod.container)
      .endSpec()
      .build()
    val resources = spec.executorKubernetesResources
    ExecutorPodSpec(pod, toJson(pod), resources.map(r => toJson(r)), resources)
  }
}
