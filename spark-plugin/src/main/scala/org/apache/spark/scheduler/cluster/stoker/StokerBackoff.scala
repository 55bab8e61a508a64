/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.util.concurrent.ThreadLocalRandom

/**
 * Jittered exponential backoff, the one used by every retry of the session (registration at
 * start, the request queue, the event stream's supervisor): a step that starts at `initialMs`,
 * doubles after each wait up to `maxMs`, and goes back to `initialMs` on [[reset]]. Each wait
 * lasts between half and all of the current step, so that many drivers that lost stoker at the
 * same moment do not come back in step. Waits are skipped once `stopped` says so.
 *
 * Not thread-safe: one instance per retry loop.
 */
private[spark] final class StokerBackoff(initialMs: Long, maxMs: Long, stopped: () => Boolean) {
  private var step = initialMs

  /** The current step (before jitter): what the next [[pause]] waits at most. */
  def stepMs: Long = step

  /** Waits for the jittered current step (unless stopped), then doubles the step. */
  def pause(): Unit = {
    StokerBackoff.sleepUnless(stopped, StokerBackoff.jitter(step))
    step = math.min(step * 2, maxMs)
  }

  /** Back to the initial step (after a success that lasted). */
  def reset(): Unit = step = initialMs
}

private[spark] object StokerBackoff {
  /** Between half and all of `ms`, at least 1. */
  def jitter(ms: Long): Long =
    math.max(1L, (ms * (0.5 + 0.5 * ThreadLocalRandom.current().nextDouble())).toLong)

  /** Sleeps `ms` unless `stopped`; an interrupt ends the sleep and is kept. */
  def sleepUnless(stopped: () => Boolean, ms: Long): Unit = {
    if (stopped()) return
    try Thread.sleep(ms) catch {
      case _: InterruptedException => Thread.currentThread().interrupt()
    }
  }
}
