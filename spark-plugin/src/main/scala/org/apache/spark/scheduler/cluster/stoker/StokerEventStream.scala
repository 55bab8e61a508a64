/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.{AtomicBoolean, AtomicReference}

import scala.util.control.NonFatal

import dev.stoker.proto.v1.{ExecutorAllocatorGrpc, WatchEvent, WatchExecutorsRequest}
import io.grpc.{Context, StatusRuntimeException}

import org.apache.spark.internal.Logging
import org.apache.spark.scheduler.ExecutorExited

/**
 * The application's event stream, and the supervisor of the connection: the `stoker-watch`
 * thread runs WatchExecutors while attached; when the stream (or a heartbeat, or a request)
 * fails it detaches, backs off ([[StokerBackoff]]), re-registers (`reRegister`, with the same
 * app id and token) and resumes the stream from the last handled sequence number (or from 0
 * when stoker's incarnation changed). Each event becomes the tracker's actions, carried out on
 * the driver outside every lock.
 */
private[spark] final class StokerEventStream(
    blocking: ExecutorAllocatorGrpc.ExecutorAllocatorBlockingStub,
    target: String,
    appId: String,
    settings: StokerSettings,
    attachment: StokerAttachment,
    driver: StokerDriver,
    stopped: () => Boolean,
    reRegister: () => Boolean,
    /** Called for every executor reported removed, before the driver hears of it. */
    onRemoved: String => Unit) extends Logging {

  import StokerSession.describe

  private val appFailed = new AtomicBoolean(false)
  private val currentWatch = new AtomicReference[Context.CancellableContext]()
  @volatile private var thread: Thread = null

  def start(): Unit = {
    val t = new Thread(() => supervise(), "stoker-watch")
    t.setDaemon(true)
    thread = t
    t.start()
  }

  /** After `stopped` is set: ends the stream and waits (bounded) for the thread. */
  def stop(): Unit = {
    cancel()
    val t = thread
    if (t != null) {
      try t.join(2000) catch {
        case _: InterruptedException => Thread.currentThread().interrupt()
      }
    }
  }

  /** Marks the session detached (if epoch `e` is still current) and ends the stream. */
  def reconnect(e: Long, why: String): Unit = {
    if (attachment.detach(e) && !stopped()) {
      logWarning(s"stoker: lost the connection to $target ($why); re-attaching")
    }
    cancel()
  }

  /** Ends the current stream; the supervisor reopens it for the current epoch. */
  def cancel(): Unit = {
    val ctx = currentWatch.get()
    if (ctx != null) ctx.cancel(null)
  }

  private def supervise(): Unit = {
    val backoff = new StokerBackoff(settings.initialBackoffMs, settings.maxBackoffMs, stopped)
    while (!stopped()) {
      try {
        val state = attachment.state
        if (!state.attached) {
          if (!reRegister()) backoff.pause()
        } else {
          val startedNs = System.nanoTime()
          val outcome = runWatch(state.epoch, state.lastSeq)
          if (!stopped()) {
            if (System.nanoTime() - startedNs > TimeUnit.SECONDS.toNanos(5)) backoff.reset()
            if (!attachment.movedOn(state.epoch)) {
              reconnect(state.epoch, s"event stream: $outcome")
              backoff.pause()
            }
          }
        }
      } catch {
        case NonFatal(t) =>
          logWarning("stoker: unexpected error in the event stream supervisor", t)
          backoff.pause()
      }
    }
  }

  /** Runs one WatchExecutors stream until it ends; says why it ended. */
  private def runWatch(e: Long, afterSeq: Long): String = {
    val ctx = Context.current().withCancellation()
    currentWatch.set(ctx)
    try {
      if (!attachment.isCurrent(e) || stopped()) return "superseded"
      val req = WatchExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(attachment.currentToken).setAfterSeq(afterSeq).build()
      ctx.run { () =>
        val it = blocking.watchExecutors(req)
        while (it.hasNext) handle(e, it.next())
      }
      "stoker closed the event stream"
    } catch {
      case ex: StatusRuntimeException => describe(ex)
      case NonFatal(ex) => ex.toString
    } finally {
      currentWatch.compareAndSet(ctx, null)
      ctx.cancel(null)
    }
  }

  private def handle(e: Long, ev: WatchEvent): Unit = attachment.accept(e, ev) match {
    case StokerAttachment.Stale =>
    case StokerAttachment.Fresh(gap, actions) =>
      gap.foreach { case (from, to) =>
        logWarning(s"stoker: events $from to $to of application $appId were not received " +
          "(forgotten by stoker)")
      }
      actions.foreach {
        case StokerAction.RemoveExecutor(id, _) => onRemoved(id)
        case _ =>
      }
      actions.foreach(perform)
  }

  private def perform(action: StokerAction): Unit = {
    try {
      action match {
        case StokerAction.RemoveExecutor(id, reason) =>
          reason match {
            case ExecutorExited(_, true, _) => logWarning(reason.message)
            case _ => logInfo(reason.message)
          }
          driver.removeExecutor(id, reason)
        case StokerAction.Info(m) => logInfo(m)
        case StokerAction.Warn(m) => logWarning(m)
        case StokerAction.FailApplication(m) =>
          if (appFailed.compareAndSet(false, true)) driver.applicationFailed(m)
        case StokerAction.Reclaim(request) =>
          logWarning(request.message)
          driver.reclaim(request)
      }
    } catch {
      case NonFatal(t) => logWarning(s"stoker: error while handling $action", t)
    }
  }
}
