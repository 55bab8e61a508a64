/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import org.apache.spark.{SparkContext, SparkException}
import org.apache.spark.scheduler.{ExternalClusterManager, SchedulerBackend, TaskScheduler, TaskSchedulerImpl}

/**
 * Spark finds this class through META-INF/services/org.apache.spark.scheduler.ExternalClusterManager
 * and uses it for master URLs `spark+stoker://host:port` (accepted by spark-submit) and
 * `stoker://host:port` (for programs that set the master in code).
 */
private[spark] class StokerClusterManager extends ExternalClusterManager {

  override def canCreate(masterURL: String): Boolean = StokerMaster.isStokerUrl(masterURL)

  override def createTaskScheduler(sc: SparkContext, masterURL: String): TaskScheduler = {
    StokerClusterManager.parseMaster(masterURL) // fail before anything starts
    new TaskSchedulerImpl(sc)
  }

  override def createSchedulerBackend(
      sc: SparkContext,
      masterURL: String,
      scheduler: TaskScheduler): SchedulerBackend = {
    new StokerSchedulerBackend(scheduler.asInstanceOf[TaskSchedulerImpl], sc,
      StokerClusterManager.parseMaster(masterURL))
  }

  override def initialize(scheduler: TaskScheduler, backend: SchedulerBackend): Unit = {
    scheduler.asInstanceOf[TaskSchedulerImpl].initialize(backend)
  }
}

private[spark] object StokerClusterManager {
  /** The master URL, or a SparkException whose message says what is wrong with it. */
  def parseMaster(masterURL: String): StokerMaster =
    try StokerMaster.parse(masterURL) catch {
      case e: IllegalArgumentException => throw new SparkException(e.getMessage, e)
    }
}
