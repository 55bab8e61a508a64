/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.util.concurrent.TimeUnit

import dev.stoker.proto.v1.{RegisterApplicationResponse, WatchEvent}

/**
 * The session's attachment to stoker, as a state machine under one lock:
 *
 * {{{
 *   detached --registration--> attached(epoch e) --detach(e)--> detached --...
 *                                  |  a new incarnation seen, or a re-attachment: epoch e + 1
 * }}}
 *
 * It holds the application's token, stoker's incarnation, the lease TTL, the epoch (which
 * changes whenever the event stream must be reopened: a re-registration by the supervisor, or a
 * new incarnation seen by anyone; events of a stream of an older epoch are dropped), the highest
 * event sequence number handled, and the driver's view of stoker's executors (the
 * [[StokerExecutorTracker]] that registration and the event stream share).
 *
 * Thread-safe; callers never hold its lock while calling stoker or Spark.
 */
private[spark] final class StokerAttachment(initialToken: String) {
  import StokerAttachment._

  private val lock = new Object
  private var token: String = initialToken
  private var incarnation: String = null
  private var leaseTtlMs: Long = 0L
  /** True while the session is attached; false while re-attaching. */
  private var registered = false
  private var everRegistered = false
  private var epoch = 0L
  /** The highest event sequence number handled. */
  private var lastSeq = 0L
  private val tracker = new StokerExecutorTracker

  def currentToken: String = lock.synchronized(token)
  def currentIncarnation: Option[String] = lock.synchronized(Option(incarnation))
  def lastHandledSeq: Long = lock.synchronized(lastSeq)
  def isAttached: Boolean = lock.synchronized(registered)
  def wasEverRegistered: Boolean = lock.synchronized(everRegistered)
  def leaseTtl: Long = lock.synchronized(leaseTtlMs)
  def maxExecutorId: Long = lock.synchronized(tracker.maxExecutorId)
  def liveExecutorIds: Seq[String] = lock.synchronized(tracker.liveExecutorIds)
  def hasExited(id: String): Boolean = lock.synchronized(tracker.hasExited(id))
  /** The executors of `profile` that stoker reported and that have not exited. */
  def liveExecutorsOf(profile: Int): Seq[String] =
    lock.synchronized(tracker.liveExecutorsOf(profile))

  /** What the supervisor needs to decide its next step. */
  def state: State = lock.synchronized(State(epoch, lastSeq, registered))

  /** Whether the session is attached in epoch `e`. */
  def isCurrent(e: Long): Boolean = lock.synchronized(registered && epoch == e)

  /** Whether the session is attached in an epoch other than `e` (only the stream must reopen). */
  def movedOn(e: Long): Boolean = lock.synchronized(registered && epoch != e)

  /** For a heartbeat: (attached, epoch, last handled seq, token, incarnation). */
  def heartbeatView: (Boolean, Long, Long, String, String) =
    lock.synchronized((registered, epoch, lastSeq, token, incarnation))

  /** Takes a heartbeat's lease TTL, if still in epoch `e`. */
  def renewTtl(e: Long, ttlMs: Long): Unit = lock.synchronized {
    if (epoch == e && ttlMs > 0) leaseTtlMs = ttlMs
  }

  /**
   * What a registration request carries: the token, the highest executor id, and the executors
   * believed alive (the driver's `driverIds`, which are noted first, and stoker's live ones).
   */
  def registrationView(driverIds: Seq[String]): (String, Long, Seq[String]) = lock.synchronized {
    driverIds.foreach(tracker.noteExecutorId)
    val known = (driverIds ++ tracker.liveExecutorIds).distinct.filterNot(tracker.hasExited)
    (token, tracker.maxExecutorId, known)
  }

  /** Takes a registration's answer: attached, in a new epoch when `reattach` or stoker changed. */
  def registered(resp: RegisterApplicationResponse, reattach: Boolean): Registered =
    lock.synchronized {
      val tokenChanged = resp.getToken.nonEmpty && resp.getToken != token
      if (tokenChanged) token = resp.getToken
      val previous = incarnation
      val changed = previous != null && previous != resp.getIncarnation
      if (changed) lastSeq = 0L
      incarnation = resp.getIncarnation
      if (resp.getLeaseTtlMs > 0) leaseTtlMs = resp.getLeaseTtlMs
      if (reattach || changed) epoch += 1
      val wasRegistered = everRegistered
      registered = true
      everRegistered = true
      lock.notifyAll()
      Registered(Option(previous), changed, tokenChanged && wasRegistered, lastSeq, leaseTtlMs)
    }

  /** Detaches, if still attached in epoch `e`; true when this call detached. */
  def detach(e: Long): Boolean = lock.synchronized {
    if (registered && epoch == e) {
      registered = false
      true
    } else {
      false
    }
  }

  /** Waits until attached; the epoch, or -1 at the deadline, on `stopped` or on interrupt. */
  def awaitAttached(deadlineNs: Long, stopped: () => Boolean): Long = lock.synchronized {
    try {
      while (!registered && !stopped()) {
        val waitMs = TimeUnit.NANOSECONDS.toMillis(deadlineNs - System.nanoTime())
        if (waitMs <= 0) return -1L
        lock.wait(waitMs)
      }
    } catch {
      case _: InterruptedException =>
        Thread.currentThread().interrupt()
        return -1L
    }
    if (stopped()) -1L else epoch
  }

  /** Wakes every waiter (on stop). */
  def wakeAll(): Unit = lock.synchronized(lock.notifyAll())

  /**
   * Takes one event of a stream of epoch `e`: what to do about it, or `Stale` for an event of
   * an older epoch or one already handled (a resumed stream). A gap is reported with the actions.
   */
  def accept(e: Long, ev: WatchEvent): Accepted = lock.synchronized {
    if (epoch != e) return Stale
    val seq = ev.getSeq
    if (seq != 0 && seq <= lastSeq) return Stale
    val gap = if (seq > lastSeq + 1) Some((lastSeq + 1, seq - 1)) else None
    if (seq > lastSeq) lastSeq = seq
    Fresh(gap, tracker.handle(ev))
  }
}

private[spark] object StokerAttachment {
  /** The supervisor's view. */
  case class State(epoch: Long, lastSeq: Long, attached: Boolean)

  /** What a registration changed. */
  case class Registered(
      previousIncarnation: Option[String],
      incarnationChanged: Boolean,
      tokenReplaced: Boolean,
      resumeAfter: Long,
      leaseTtlMs: Long)

  sealed trait Accepted
  case object Stale extends Accepted
  /** A new event: the sequence numbers missed before it (if any) and the actions it asks for. */
  case class Fresh(gap: Option[(Long, Long)], actions: Seq[StokerAction]) extends Accepted
}
