/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import dev.stoker.proto.v1.{SparkPods, SparkProfilePod}

import org.apache.spark.{SecurityManager, SparkConf}
import org.apache.spark.resource.ResourceProfile
import org.apache.spark.util.Utils

/**
 * The executor pods of an application as Spark's own Kubernetes backend would create them, for
 * the protocol's [[SparkPods]]. Its API names no Kubernetes or fabric8 type, so that the
 * scheduler backend loads and runs on a Spark without Kubernetes support: call [[available]]
 * first, and only then [[profilePod]] and [[appLevel]] (they touch Spark's Kubernetes classes
 * through [[StokerExecutorPods]]).
 */
private[spark] object StokerSparkPods {

  /** `spark.stoker.strictConf=true`: stoker refuses keys it does not honour instead of warning. */
  val StrictConfKey = "spark.stoker.strictConf"

  /** The image written into the pods when the driver sets none; stoker puts --kube-image there. */
  val ImagePlaceholder = "stoker.invalid/server-default-image:unset"

  private val ImageKeys =
    Seq("spark.kubernetes.executor.container.image", "spark.kubernetes.container.image")

  /** Whether Spark's Kubernetes resource manager (and its fabric8 client) is on the class path. */
  def available(): Boolean =
    Utils.classIsLoadable("org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBuilder") &&
      Utils.classIsLoadable("io.fabric8.kubernetes.api.model.PodBuilder")

  /** True when the driver names no executor image (stoker's --kube-image is then used). */
  def imageFromServer(conf: SparkConf): Boolean =
    !ImageKeys.exists(k => conf.getOption(k).exists(_.trim.nonEmpty))

  /** The conf the builder sees: the driver's, plus the image placeholder when it names none. */
  private def builderConf(conf: SparkConf): SparkConf = {
    val c = conf.clone
    if (imageFromServer(conf)) c.set(ImageKeys.head, ImagePlaceholder)
    c
  }

  private val VolumesPrefix = "spark.kubernetes.executor.volumes."
  private val VolumeTypes = Seq("hostPath", "emptyDir", "nfs", "persistentVolumeClaim")
  private val SecretKeyRefPrefix = "spark.kubernetes.executor.secretKeyRef."

  /**
   * Input Spark's builder refuses with a message that does not name the key (or names only part
   * of it): the first problem, naming the key. Checked before the builder runs.
   */
  def badInput(conf: SparkConf): Option[String] = {
    val volumeKeys = conf.getAllWithPrefix(VolumesPrefix).map(_._1).sorted.toSeq
    val malformed = volumeKeys.collectFirst {
      case k if k.split("\\.", 3).length < 3 =>
        s"$VolumesPrefix$k: expected $VolumesPrefix<type>.<name>.<option>"
      case k if !VolumeTypes.contains(k.split("\\.", 3)(0)) =>
        s"$VolumesPrefix$k: unknown volume type '${k.split("\\.", 3)(0)}' (Spark knows " +
          s"${VolumeTypes.mkString(", ")})"
    }
    lazy val noMountPath = volumeKeys.map(_.split("\\.", 3).take(2).mkString("."))
      .distinct
      .find(v => !conf.contains(s"$VolumesPrefix$v.mount.path"))
      .map(v => s"$VolumesPrefix$v.mount.path: missing (volume '${v.split("\\.")(1)}' is " +
        "configured without a mount path)")
    lazy val badSecretRef = conf.getAllWithPrefix(SecretKeyRefPrefix).sortBy(_._1).collectFirst {
      case (env, ref) if ref.split(":").length != 2 =>
        s"$SecretKeyRefPrefix$env: '$ref' is not <secret name>:<key>"
    }
    malformed.orElse(noMountPath).orElse(badSecretRef)
  }

  /**
   * spark.kubernetes.* keys set by the user that stoker does not honour, with the reason: the
   * "not honoured" rows of [[KeyCoverage]] (the same rows make the README's key table). Keys
   * that stoker replaces by design (allocation batches, snapshot and polling intervals) are not
   * listed.
   */
  def unsupportedKeys(conf: SparkConf): Map[String, String] = KeyCoverage.unsupportedKeys(conf)

  /**
   * One resource profile's executor pod, built by Spark's KubernetesExecutorBuilder for the
   * placeholder executor id; a failure (the first bad key, or Spark's own message) goes into
   * `error` for stoker to refuse the registration with. `conf` must carry a stable pod name
   * prefix ([[StokerExecutorPods.ensurePodNamePrefix]]).
   */
  def profilePod(conf: SparkConf, appId: String, rp: ResourceProfile,
      secMgr: SecurityManager): SparkProfilePod = {
    val b = SparkProfilePod.newBuilder().setResourceProfileId(rp.id)
    badInput(conf) match {
      case Some(problem) => b.setError(problem).build()
      case None =>
        try {
          val spec = StokerExecutorPods.build(builderConf(conf), appId, rp, secMgr)
          b.setPodJson(spec.podJson).addAllResourcesJson(spec.resourcesJson.asJava).build()
        } catch {
          case NonFatal(e) =>
            b.setError(s"${e.getClass.getSimpleName}: ${e.getMessage}").build()
        }
    }
  }

  /**
   * spark.kubernetes.driver.waitToReusePersistentVolumeClaim, as Spark's ExecutorPodsAllocator
   * reads it: with ownPersistentVolumeClaim and reusePersistentVolumeClaim also true, a new
   * executor waits for a free claim once the driver has `maxPVCs` claims
   * (spark.dynamicAllocation.maxExecutors with dynamic allocation, else spark.executor.instances);
   * 0 when executors never wait.
   */
  def claimsBeforeWaiting(conf: SparkConf): Int = {
    import org.apache.spark.deploy.k8s.Config._
    val waits = conf.get(KUBERNETES_DRIVER_OWN_PVC) && conf.get(KUBERNETES_DRIVER_REUSE_PVC) &&
      conf.get(KUBERNETES_DRIVER_WAIT_TO_REUSE_PVC)
    if (!waits) 0
    else if (Utils.isDynamicAllocationEnabled(conf)) {
      math.max(0, conf.get(org.apache.spark.internal.config.DYN_ALLOCATION_MAX_EXECUTORS))
    } else {
      math.max(0, conf.getInt(org.apache.spark.internal.config.EXECUTOR_INSTANCES.key,
        org.apache.spark.scheduler.cluster.SchedulerBackendUtils.DEFAULT_NUMBER_EXECUTORS))
    }
  }

  /**
   * Everything but the profiles, after making `conf`'s pod name prefix stable: placeholders, the executor ConfigMap (as Spark's
   * KubernetesClusterSchedulerBackend builds it, unless spark.kubernetes.executor.disableConfigMap),
   * the keys stoker does not honour and strictness.
   */
  def appLevel(conf: SparkConf, appId: String): SparkPods.Builder = {
    StokerExecutorPods.ensurePodNamePrefix(conf)
    val b = SparkPods.newBuilder()
      .setPlaceholderExecutorId(StokerExecutorPods.PlaceholderExecutorId)
      .setImageFromServer(imageFromServer(conf))
      .setImagePlaceholder(ImagePlaceholder)
      .putAllUnsupportedKeys(unsupportedKeys(conf).asJava)
      .setStrict(conf.getBoolean(StrictConfKey, false))
      .setClaimsBeforeWaiting(claimsBeforeWaiting(conf))
    StokerExecutorPods.executorConfigMapJson(conf, appId).foreach(b.addAppResourcesJson)
    b
  }
}
