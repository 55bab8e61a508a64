/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.util.concurrent.{ExecutorService, RejectedExecutionException, TimeUnit}

import scala.concurrent.{Future, Promise}
import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import io.grpc.{ManagedChannel, StatusRuntimeException}

import org.apache.spark.internal.Logging
import org.apache.spark.util.ThreadUtils

/**
 * The ordered queue of requests Spark made (totals, kills, decommissions, template updates):
 * ONE thread, `stoker-requests`, sends them in order. Each waits until the session is attached
 * and is retried with [[StokerBackoff]] while stoker is unreachable, for at most
 * `settings.retryTimeoutMs`; a call that says stoker no longer knows the application (or the
 * token) asks the supervisor to re-attach (`reconnect`) and is retried after. Callers get a
 * Future at once and never block.
 */
private[spark] final class StokerRequests(
    channel: ManagedChannel,
    target: String,
    settings: StokerSettings,
    attachment: StokerAttachment,
    stopped: () => Boolean,
    reconnect: (Long, String) => Unit) extends Logging {

  import StokerSession.{describe, isReattach, isTransient}

  private val thread: ExecutorService =
    ThreadUtils.newDaemonSingleThreadExecutor("stoker-requests")

  private final class Op(val what: String, val deadlineNs: Long, val body: () => Unit)
    extends Runnable {
    val promise: Promise[Boolean] = Promise[Boolean]()
    override def run(): Unit = {
      val ok = try runWithRetry(this) catch {
        case NonFatal(e) =>
          logWarning(s"stoker: $what failed", e)
          false
      }
      promise.trySuccess(ok)
    }
  }

  /** Queues `body` (one gRPC call); the Future says whether stoker took it. */
  def enqueue(what: String)(body: => Unit): Future[Boolean] = {
    val op = new Op(what,
      System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(settings.retryTimeoutMs), () => body)
    if (stopped()) {
      op.promise.trySuccess(false)
    } else {
      try thread.execute(op) catch {
        case _: RejectedExecutionException => op.promise.trySuccess(false)
      }
    }
    op.promise.future
  }

  /** Stops the thread; requests not sent complete with false. */
  def stop(): Unit = {
    thread.shutdownNow().asScala.foreach {
      case op: StokerRequests#Op => op.promise.trySuccess(false)
      case _ =>
    }
    try thread.awaitTermination(2, TimeUnit.SECONDS) catch {
      case _: InterruptedException => Thread.currentThread().interrupt()
    }
  }

  private def runWithRetry(op: Op): Boolean = {
    val backoff = new StokerBackoff(settings.initialBackoffMs, settings.maxBackoffMs, stopped)
    var attempt = 0
    while (!stopped()) {
      val e = attachment.awaitAttached(op.deadlineNs, stopped)
      if (e < 0) {
        if (!stopped()) {
          logWarning(s"stoker: gave up on ${op.what}: not attached to stoker at $target " +
            s"within ${settings.retryTimeoutMs} ms")
        }
        return false
      }
      attempt += 1
      try {
        op.body()
        return true
      } catch {
        case ex: StatusRuntimeException =>
          if (stopped()) return false
          val code = ex.getStatus.getCode
          if (isReattach(code)) {
            reconnect(e, s"${op.what}: ${describe(ex)}")
          } else if (!isTransient(code)) {
            logWarning(s"stoker refused ${op.what}: ${describe(ex)}")
            return false
          }
          val leftNs = op.deadlineNs - System.nanoTime()
          if (leftNs <= TimeUnit.MILLISECONDS.toNanos(backoff.stepMs)) {
            logWarning(s"stoker: gave up on ${op.what} after $attempt attempt(s): " +
              describe(ex))
            return false
          }
          logDebug(s"stoker: ${op.what} failed (${describe(ex)}); retrying")
      }
      backoff.pause()
      channel.resetConnectBackoff()
    }
    false
  }
}
