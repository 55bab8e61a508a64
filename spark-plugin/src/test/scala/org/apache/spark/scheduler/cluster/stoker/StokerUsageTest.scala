package org.apache.spark.scheduler.cluster.stoker

import org.apache.spark.SparkConf
import org.junit.jupiter.api.Test

class StokerUsageTest extends Checks {
  import StokerUsage.Peak

  private val MiB = 1L << 20

  @Test def theLargestPeaksOfTheExecutorsThatRanTasksPerProfile(): Unit = {
    val usage = StokerUsage.of(Seq(
      Peak(0, ranTasks = true, heapBytes = 300 * MiB, rssBytes = 0),
      Peak(0, ranTasks = true, heapBytes = 120 * MiB, rssBytes = 0),
      // Ran no task: not counted, measured or not.
      Peak(0, ranTasks = false, heapBytes = 900 * MiB, rssBytes = 0),
      Peak(0, ranTasks = false, heapBytes = 0, rssBytes = 0),
      Peak(2, ranTasks = true, heapBytes = 50 * MiB, rssBytes = 400 * MiB),
      Peak(2, ranTasks = true, heapBytes = 70 * MiB, rssBytes = 380 * MiB)))
    eq(Seq(0, 2), usage.map(_.getResourceProfileId))
    val Seq(p0, p2) = usage
    eq(300 * MiB, p0.getPeakHeapBytes)
    eq(0L, p0.getPeakRssBytes, "no process-tree metrics: resident memory unknown")
    eq((2, 2), (p0.getExecutors, p0.getExecutorsMeasured))
    eq(70 * MiB, p2.getPeakHeapBytes)
    eq(400 * MiB, p2.getPeakRssBytes)
  }

  @Test def anExecutorWithoutMetricsLeavesTheProfileIncomplete(): Unit = {
    val Seq(p) = StokerUsage.of(Seq(
      Peak(0, ranTasks = true, heapBytes = 300 * MiB, rssBytes = 500 * MiB),
      Peak(0, ranTasks = true, heapBytes = 0, rssBytes = 0)))
    eq((2, 1), (p.getExecutors, p.getExecutorsMeasured), "stoker judges only complete profiles")
    eq(300 * MiB, p.getPeakHeapBytes)
    eq(500 * MiB, p.getPeakRssBytes)
    // Resident memory from only some executors is not known for the profile.
    val Seq(q) = StokerUsage.of(Seq(
      Peak(0, ranTasks = true, heapBytes = 300 * MiB, rssBytes = 500 * MiB),
      Peak(0, ranTasks = true, heapBytes = 200 * MiB, rssBytes = 0)))
    eq(0L, q.getPeakRssBytes)
  }

  @Test def noExecutorRanATaskNoUsage(): Unit = {
    eq(Nil, StokerUsage.of(Seq(Peak(0, ranTasks = false, heapBytes = 10 * MiB, rssBytes = 0))))
    eq(Nil, StokerUsage.of(Nil))
  }

  @Test def reportedOnlyWhenExecutorsPollTheirMemory(): Unit = {
    val off = StokerUsage.measured(new SparkConf(false))
    check(off.left.exists(_.contains("spark.executor.metrics.pollingInterval is 0")), off.toString)
    eq(Right(()), StokerUsage.measured(
      new SparkConf(false).set("spark.executor.metrics.pollingInterval", "200ms")))
  }

  @Test def notReportedOnceSparkMayHaveDroppedDeadExecutors(): Unit = {
    val conf = new SparkConf(false).set("spark.ui.retainedDeadExecutors", "2")
    val peaks = Seq(
      Peak(0, ranTasks = true, heapBytes = 10 * MiB, rssBytes = 0, active = false),
      Peak(0, ranTasks = true, heapBytes = 10 * MiB, rssBytes = 0))
    eq(Right(peaks), StokerUsage.complete(conf, peaks))
    val more = peaks :+ Peak(0, ranTasks = true, heapBytes = 10 * MiB, rssBytes = 0, active = false)
    val dropped = StokerUsage.complete(conf, more)
    check(dropped.left.exists(_.contains("spark.ui.retainedDeadExecutors = 2")), dropped.toString)
  }
}
