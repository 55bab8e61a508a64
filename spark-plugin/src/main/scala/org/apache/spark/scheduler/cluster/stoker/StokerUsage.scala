/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import scala.util.control.NonFatal

import dev.stoker.proto.v1.ProfileUsage
import org.apache.spark.{SparkConf, SparkContext}
import org.apache.spark.internal.Logging
import org.apache.spark.internal.config.EXECUTOR_METRICS_POLLING_INTERVAL

/**
 * What a run's executors used at most, per resource profile, sent to stoker when the driver
 * unregisters: with `spark.stoker.sizing.key`, stoker steps a remembered size down one notch when
 * every executor of the profile used at most half of the smaller size.
 *
 * The figures are Spark's own executor metrics as the driver's status store keeps them: each
 * executor's peaks (`ExecutorSummary.peakMemoryMetrics`, from heartbeats and task ends) of
 * `JVMHeapMemory` and, when `spark.executor.processTreeMetrics.enabled` is on, the resident
 * memory of its process tree (JVM, Python workers, other children). Only executors that ran a
 * task count: one that ran none used nothing of note. A profile is complete only when every
 * such executor has a heap peak; stoker judges no other.
 *
 * Only with `spark.executor.metrics.pollingInterval` above 0: with Spark's default (0) an
 * executor samples its memory only at each heartbeat (every 10 s), and a task's end carries no
 * peak, so what the driver holds is a snapshot between tasks, not the peak (measured: 43 MiB
 * reported for tasks that each held 150 MiB; 190 MiB with a 200 ms interval). Nothing is sent
 * then, and remembered sizes never step down.
 */
private[spark] object StokerUsage extends Logging {

  /** What to send at unregister: the usage of each profile, or nothing (logged why). */
  def report(sc: SparkContext): Seq[ProfileUsage] =
    try {
      measured(sc.conf).flatMap(_ => complete(sc.conf, peaksOf(sc))) match {
        case Right(peaks) => of(peaks)
        case Left(why) =>
          logInfo(s"stoker: $why")
          Nil
      }
    } catch {
      case NonFatal(e) =>
        logInfo(s"stoker: the executors' peak memory is not known: $e")
        Nil
    }

  /** Why usage is not reported (Left), or Right when it is. */
  def measured(conf: SparkConf): Either[String, Unit] =
    if (conf.get(EXECUTOR_METRICS_POLLING_INTERVAL) > 0) Right(())
    else Left("the executors' peak memory is not reported to stoker: " +
      s"${EXECUTOR_METRICS_POLLING_INTERVAL.key} is 0 (Spark then samples memory only at " +
      "heartbeats and misses the peaks), so the sizes remembered under spark.stoker.sizing.key " +
      "never step down")

  /** One executor's peaks, as the status store has them. */
  case class Peak(
      profileId: Int,
      ranTasks: Boolean,
      heapBytes: Long,
      rssBytes: Long,
      active: Boolean = true)

  private val RssMetrics =
    Seq("ProcessTreeJVMRSSMemory", "ProcessTreePythonRSSMemory", "ProcessTreeOtherRSSMemory")

  /**
   * The peaks, unless the status store may have dropped some: beyond
   * `spark.ui.retainedDeadExecutors` (100) dead executors it deletes the oldest, peaks and all.
   */
  def complete(conf: SparkConf, peaks: Seq[Peak]): Either[String, Seq[Peak]] = {
    val retained = conf.getInt(RetainedDeadExecutors, 100)
    val dead = peaks.count(!_.active)
    if (dead < retained) Right(peaks)
    else Left(s"the executors' peak memory is not reported to stoker: $dead executors have " +
      s"exited, and Spark keeps the metrics of at most $RetainedDeadExecutors = $retained")
  }

  private val RetainedDeadExecutors = "spark.ui.retainedDeadExecutors"

  /** The usage of each profile: the largest peaks of its executors that ran a task. */
  def of(peaks: Seq[Peak]): Seq[ProfileUsage] =
    peaks.filter(_.ranTasks).groupBy(_.profileId).toSeq.sortBy(_._1).map { case (profile, es) =>
      val measured = es.filter(_.heapBytes > 0)
      // Resident memory counts only when every measured executor has it (the metrics are on).
      val rss =
        if (measured.nonEmpty && measured.forall(_.rssBytes > 0)) measured.map(_.rssBytes).max
        else 0L
      ProfileUsage.newBuilder()
        .setResourceProfileId(profile)
        .setPeakHeapBytes(if (measured.isEmpty) 0L else measured.map(_.heapBytes).max)
        .setPeakRssBytes(rss)
        .setExecutors(es.size)
        .setExecutorsMeasured(measured.size)
        .build()
    }

  /** The peaks of every executor the driver's status store knows, the dead ones too. */
  def peaksOf(sc: SparkContext): Seq[Peak] =
    sc.statusStore.executorList(false)
      .filter(_.id != SparkContext.DRIVER_IDENTIFIER)
      .map { e =>
        val peaks = e.peakMemoryMetrics
        Peak(
          profileId = e.resourceProfileId,
          ranTasks = e.totalTasks > 0,
          heapBytes = peaks.map(_.getMetricValue("JVMHeapMemory")).getOrElse(0L),
          rssBytes = peaks.map(m => RssMetrics.map(m.getMetricValue).sum).getOrElse(0L),
          active = e.isActive)
      }
      .toSeq
}
