package org.apache.spark.scheduler.cluster.stoker

import io.fabric8.kubernetes.api.model.PodBuilder

import org.apache.spark.deploy.k8s.SparkPod
import org.apache.spark.deploy.k8s.features.KubernetesFeatureConfigStep

/** An extra executor feature step (spark.kubernetes.executor.pod.featureSteps) for KeyCoverageTest. */
class KeyCoverageSampleStep extends KubernetesFeatureConfigStep {
  override def configurePod(pod: SparkPod): SparkPod = {
    val p = new PodBuilder(pod.pod).editOrNewMetadata().addToLabels("sample-step", "yes")
      .endMetadata().build()
    SparkPod(p, pod.container)
  }
}
