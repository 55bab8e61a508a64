/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.time.{Instant, ZoneId}
import java.time.format.DateTimeFormatter

/**
 * Which executors to give back when stoker reclaims executors over the application's fair
 * share: pure functions, so that the choice is tested without Spark.
 *
 * The order: executors that have not registered with the driver yet first (they hold no task and
 * no block: stopping one loses nothing, whereas decommissioning the only registered executor
 * leaves its blocks no peer to migrate to), then idle ones (no running task), then the fewest
 * running tasks, then the least shuffle and cached data (what decommissioning has to migrate),
 * then the newest. So a busy executor is never chosen while an idle or starting one is left, and
 * among idle ones the one whose loss costs least goes first.
 */
private[spark] object StokerReclaim {

  /** stoker's request, from a ReclaimEvent. */
  case class Request(
      profileId: Int,
      count: Int,
      deadlineUnixMs: Long,
      timeoutMs: Long,
      reason: String) {

    /** `stoker: give back 2 executors by 12:00:05 (over its fair share in queue etl)`. */
    def message: String = {
      val noun = if (count == 1) "executor" else "executors"
      val by = if (deadlineUnixMs > 0) {
        s"by ${Clock.format(Instant.ofEpochMilli(deadlineUnixMs))}"
      } else {
        s"within ${timeoutMs / 1000} s"
      }
      val profile = if (profileId != 0) s" of resource profile $profileId" else ""
      val why = if (reason.nonEmpty) s" ($reason)" else ""
      s"stoker: give back $count $noun$profile $by$why"
    }
  }

  /**
   * What an executor holds: its running tasks and the data decommissioning would migrate;
   * `registered` false for an executor stoker started that has not registered with the driver.
   */
  case class Load(id: String, runningTasks: Int, shuffleBytes: Long, cachedBytes: Long,
      registered: Boolean = true) {
    def idle: Boolean = runningTasks == 0
    def describe: String =
      if (!registered) s"$id (not registered yet)"
      else if (idle) s"$id (idle)"
      else s"$id ($runningTasks running task(s))"
  }

  /** An executor stoker started that has not registered with the driver: it holds nothing. */
  def starting(id: String): Load = Load(id, 0, 0, 0, registered = false)

  /** The `count` executors to give back, in order; fewer when fewer are candidates. */
  def choose(candidates: Seq[Load], count: Int): Seq[String] = {
    if (count <= 0) return Nil
    candidates
      .sortBy(l => (if (!l.registered) 0 else if (l.idle) 1 else 2, l.runningTasks,
        l.shuffleBytes + l.cachedBytes,
        -StokerEvents.parseId(l.id).getOrElse(0L)))
      .take(count)
      .map(_.id)
  }

  private object Clock {
    private val time = DateTimeFormatter.ofPattern("HH:mm:ss").withZone(ZoneId.systemDefault())
    def format(i: Instant): String = time.format(i)
  }
}
