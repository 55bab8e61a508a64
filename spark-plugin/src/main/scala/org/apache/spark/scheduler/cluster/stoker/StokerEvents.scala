/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import scala.collection.mutable

import dev.stoker.proto.v1.{ApplicationEvent, ExecutorEvent, ExecutorState, ExitReason, ReclaimEvent, WatchEvent}

import org.apache.spark.scheduler.{ExecutorDecommission, ExecutorExited, ExecutorLossReason}

/** What the backend does about one event from stoker. */
private[spark] sealed trait StokerAction

private[spark] object StokerAction {
  /** Report the executor's loss to Spark (exactly once per executor). */
  case class RemoveExecutor(executorId: String, reason: ExecutorLossReason) extends StokerAction
  case class Info(message: String) extends StokerAction
  case class Warn(message: String) extends StokerAction
  /** stoker gave up on the application (too many executor failures). */
  case class FailApplication(message: String) extends StokerAction
  /** stoker asks for executors back (fair share): choose and decommission them. */
  case class Reclaim(request: StokerReclaim.Request) extends StokerAction
}

/** Mapping of protocol events to Spark's loss reasons: pure functions. */
private[spark] object StokerEvents {

  /** `OOM_KILLED` for EXIT_REASON_OOM_KILLED; a readable name for values this build lacks. */
  def reasonName(ev: ExecutorEvent): String = ev.getReason match {
    case ExitReason.UNRECOGNIZED => s"UNKNOWN_REASON_${ev.getReasonValue}"
    case r => r.name().stripPrefix("EXIT_REASON_")
  }

  def stateName(ev: ExecutorEvent): String = ev.getState match {
    case ExecutorState.UNRECOGNIZED => s"UNKNOWN_STATE_${ev.getStateValue}"
    case s => s.name().stripPrefix("EXECUTOR_STATE_")
  }

  private def where(ev: ExecutorEvent): String = {
    val parts = Seq(ev.getBackendName, ev.getHost).filter(_.nonEmpty)
    if (parts.isEmpty) "" else parts.mkString(" [", " on ", "]")
  }

  /**
   * The message Spark shows for an exited executor, e.g.
   * `stoker: executor 3 exited with code 137 (OOM_KILLED): Container exceeded its memory limit
   * [pod-exec-3 on 10.0.0.7]`.
   */
  def exitMessage(ev: ExecutorEvent): String = {
    val code = if (ev.hasExitCode) s"with code ${ev.getExitCode}" else "with an unknown code"
    val reason = reasonName(ev)
    val detail = if (ev.getMessage.trim.nonEmpty) s": ${ev.getMessage.trim}" else ""
    val hint = ev.getReason match {
      case ExitReason.EXIT_REASON_OOM_KILLED =>
        " (the container ran out of memory: consider raising spark.executor.memoryOverhead)"
      case _ => ""
    }
    s"stoker: executor ${ev.getExecutorId} exited $code ($reason)$detail${where(ev)}$hint"
  }

  /**
   * Spark's loss reason for an EXITED executor event: ExecutorDecommission for DECOMMISSIONED,
   * else ExecutorExited(exit code or -1, caused_by_app, message).
   */
  def lossReason(ev: ExecutorEvent): ExecutorLossReason = ev.getReason match {
    case ExitReason.EXIT_REASON_DECOMMISSIONED =>
      // No worker host: only this executor is gone, not its whole host (as Kubernetes does).
      ExecutorDecommission(None, exitMessage(ev))
    case _ =>
      ExecutorExited(if (ev.hasExitCode) ev.getExitCode else -1, ev.getCausedByApp,
        exitMessage(ev))
  }

  /** Decimal executor id, if it is one. */
  def parseId(id: String): Option[Long] =
    if (id.nonEmpty && id.length <= 18 && id.forall(c => c >= '0' && c <= '9')) Some(id.toLong)
    else None
}

/**
 * The driver's view of stoker's executors, fed with every event of the stream in order. It
 * turns each executor's first EXITED event into one [[StokerAction.RemoveExecutor]] and
 * ignores repeats (terminal events can arrive twice, e.g. after a re-attachment), and
 * remembers what a re-registration must tell stoker: the highest executor id seen and the
 * executors stoker reported that have not exited. Not thread-safe: callers serialize.
 */
private[spark] class StokerExecutorTracker {
  private val exited = mutable.HashSet[String]()
  // executor id -> resource profile id, for executors stoker told us about that have not exited.
  private val live = mutable.LinkedHashMap[String, Int]()
  private var maxId = 0L
  private var failed = false

  def maxExecutorId: Long = maxId
  def liveExecutorIds: Seq[String] = live.keys.toSeq
  /** The executors of resource profile `profile` that stoker reported and that have not exited. */
  def liveExecutorsOf(profile: Int): Seq[String] =
    live.collect { case (id, p) if p == profile => id }.toSeq
  def hasExited(id: String): Boolean = exited.contains(id)
  def exitedCount: Int = exited.size

  /** Notes an executor id learnt elsewhere (e.g. registered with the driver). */
  def noteExecutorId(id: String): Unit = StokerEvents.parseId(id).foreach { n =>
    if (n > maxId) maxId = n
  }

  def handle(event: WatchEvent): Seq[StokerAction] = event.getKindCase match {
    case WatchEvent.KindCase.EXECUTOR => handleExecutor(event.getExecutor)
    case WatchEvent.KindCase.APPLICATION => handleApplication(event.getApplication)
    case WatchEvent.KindCase.RECLAIM => handleReclaim(event.getReclaim)
    case other => Seq(StokerAction.Warn(
      s"stoker: ignoring event ${event.getSeq} of an unknown kind ($other)"))
  }

  private def handleExecutor(ev: ExecutorEvent): Seq[StokerAction] = {
    val id = ev.getExecutorId
    if (id.isEmpty) {
      return Seq(StokerAction.Warn(s"stoker: ignoring an executor event without executor id: " +
        StokerEvents.stateName(ev)))
    }
    noteExecutorId(id)
    if (exited.contains(id)) {
      // A repeated terminal event, or a late one for an executor already reported.
      return Nil
    }
    ev.getState match {
      case ExecutorState.EXECUTOR_STATE_EXITED =>
        exited += id
        live -= id
        val remove = StokerAction.RemoveExecutor(id, StokerEvents.lossReason(ev))
        // An executor that could not even start (refused by the API server, an image that
        // cannot be pulled) never reaches Spark, which would say nothing: the user must see why.
        if (ev.getReason == ExitReason.EXIT_REASON_START_FAILED) {
          Seq(StokerAction.Warn(StokerEvents.exitMessage(ev)), remove)
        } else {
          Seq(remove)
        }
      case ExecutorState.EXECUTOR_STATE_REQUESTED =>
        live(id) = ev.getResourceProfileId
        Seq(StokerAction.Info(
          s"stoker: requested executor $id (resource profile ${ev.getResourceProfileId})"))
      case ExecutorState.EXECUTOR_STATE_RUNNING =>
        live(id) = ev.getResourceProfileId
        val host = if (ev.getHost.nonEmpty) ev.getHost else "an unknown host"
        val name = if (ev.getBackendName.nonEmpty) s" (${ev.getBackendName})" else ""
        Seq(StokerAction.Info(s"stoker: executor $id is running on $host$name"))
      case _ =>
        // PENDING and states this build does not know: tracked, not logged at info.
        live(id) = ev.getResourceProfileId
        Nil
    }
  }

  private def handleReclaim(ev: ReclaimEvent): Seq[StokerAction] =
    if (ev.getCount <= 0) Nil
    else Seq(StokerAction.Reclaim(StokerReclaim.Request(ev.getResourceProfileId,
      math.min(ev.getCount, Int.MaxValue.toLong).toInt, ev.getDeadlineUnixMs, ev.getTimeoutMs,
      ev.getReason)))

  private def handleApplication(ev: ApplicationEvent): Seq[StokerAction] = ev.getKind match {
    case ApplicationEvent.Kind.KIND_FAILED =>
      if (failed) Nil
      else {
        failed = true
        val msg = if (ev.getMessage.nonEmpty) ev.getMessage else "no reason given"
        Seq(StokerAction.FailApplication(s"stoker failed the application: $msg"))
      }
    case ApplicationEvent.Kind.KIND_WARNING =>
      Seq(StokerAction.Warn(s"stoker: ${ev.getMessage}"))
    case _ =>
      Seq(StokerAction.Warn(
        s"stoker: application event of unknown kind ${ev.getKindValue}: ${ev.getMessage}"))
  }
}
