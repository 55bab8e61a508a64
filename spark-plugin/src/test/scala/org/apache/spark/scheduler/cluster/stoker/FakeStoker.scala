package org.apache.spark.scheduler.cluster.stoker

import scala.collection.mutable.ArrayBuffer
import scala.jdk.CollectionConverters._

import dev.stoker.proto.v1._
import io.grpc.{Server, Status}
import io.grpc.inprocess.InProcessServerBuilder
import io.grpc.stub.{ServerCallStreamObserver, StreamObserver}

/**
 * An in-memory stoker for one application: records every call, emits events on demand and
 * checks tokens as the protocol says. `restart` gives a new incarnation that forgot everything.
 */
class FakeStoker(val incarnation: String, val leaseTtlMs: Long = 30000L)
  extends ExecutorAllocatorGrpc.ExecutorAllocatorImplBase {

  private val lock = new Object
  val registrations = new ArrayBuffer[RegisterApplicationRequest]
  val totals = new ArrayBuffer[RequestTotalExecutorsRequest]
  val kills = new ArrayBuffer[KillExecutorsRequest]
  val decommissions = new ArrayBuffer[DecommissionExecutorsRequest]
  val watches = new ArrayBuffer[WatchExecutorsRequest]
  val heartbeats = new ArrayBuffer[HeartbeatRequest]
  val unregistrations = new ArrayBuffer[UnregisterApplicationRequest]
  /** Every call in order: "register", "totals 0=3", "kill 1,2", ... */
  val calls = new ArrayBuffer[String]
  private var token: String = null
  private val events = new ArrayBuffer[WatchEvent]
  private val watchers = new ArrayBuffer[StreamObserver[WatchEvent]]

  /** When set, RegisterApplication fails with this status. */
  @volatile var registerFailure: Option[Status] = None
  /** When set, the heartbeat answers with this incarnation. */
  @volatile var heartbeatIncarnation: Option[String] = None

  def snapshot[T](f: => T): T = lock.synchronized(f)
  def callsSeen: Seq[String] = lock.synchronized(calls.toList)
  def registrationsSeen: Seq[RegisterApplicationRequest] = lock.synchronized(registrations.toList)
  def watchesSeen: Seq[WatchExecutorsRequest] = lock.synchronized(watches.toList)
  def heartbeatsSeen: Seq[HeartbeatRequest] = lock.synchronized(heartbeats.toList)
  def activeWatchers: Int = lock.synchronized(watchers.size)

  private def authorized[T](appToken: String, obs: StreamObserver[T]): Boolean =
    lock.synchronized {
      if (token == null) {
        obs.onError(Status.NOT_FOUND.withDescription("unknown application").asRuntimeException())
        false
      } else if (appToken != token) {
        obs.onError(Status.PERMISSION_DENIED.withDescription("wrong token").asRuntimeException())
        false
      } else {
        true
      }
    }

  override def registerApplication(
      req: RegisterApplicationRequest,
      obs: StreamObserver[RegisterApplicationResponse]): Unit = {
    registerFailure.foreach { s =>
      lock.synchronized(calls += "register-refused")
      obs.onError(s.asRuntimeException())
      return
    }
    val resp = lock.synchronized {
      registrations += req
      calls += "register"
      val reattached = token != null
      if (token != null && req.getToken != token) {
        obs.onError(Status.PERMISSION_DENIED.withDescription("token").asRuntimeException())
        return
      }
      if (token == null) token = if (req.getToken.nonEmpty) req.getToken else "server-token"
      RegisterApplicationResponse.newBuilder().setToken(token).setLeaseTtlMs(leaseTtlMs)
        .setIncarnation(incarnation).setReattached(reattached).setLastSeq(events.size.toLong)
        .build()
    }
    obs.onNext(resp)
    obs.onCompleted()
  }

  override def requestTotalExecutors(
      req: RequestTotalExecutorsRequest,
      obs: StreamObserver[RequestTotalExecutorsResponse]): Unit = {
    if (!authorized(req.getToken, obs)) return
    lock.synchronized {
      totals += req
      calls += "totals " + req.getTargetsList.asScala
        .map(t => s"${t.getResourceProfileId}=${t.getTotal}").mkString(",")
    }
    obs.onNext(RequestTotalExecutorsResponse.getDefaultInstance)
    obs.onCompleted()
  }

  override def killExecutors(
      req: KillExecutorsRequest,
      obs: StreamObserver[KillExecutorsResponse]): Unit = {
    if (!authorized(req.getToken, obs)) return
    lock.synchronized {
      kills += req
      calls += "kill " + req.getExecutorIdsList.asScala.mkString(",")
    }
    obs.onNext(KillExecutorsResponse.newBuilder().addAllKilled(req.getExecutorIdsList).build())
    obs.onCompleted()
  }

  override def decommissionExecutors(
      req: DecommissionExecutorsRequest,
      obs: StreamObserver[DecommissionExecutorsResponse]): Unit = {
    if (!authorized(req.getToken, obs)) return
    lock.synchronized {
      decommissions += req
      calls += "decommission " + req.getExecutorIdsList.asScala.mkString(",")
    }
    obs.onNext(DecommissionExecutorsResponse.newBuilder()
      .addAllDecommissioning(req.getExecutorIdsList).build())
    obs.onCompleted()
  }

  override def watchExecutors(req: WatchExecutorsRequest, obs: StreamObserver[WatchEvent]): Unit = {
    if (!authorized(req.getToken, obs)) return
    val serverObs = obs.asInstanceOf[ServerCallStreamObserver[WatchEvent]]
    lock.synchronized {
      watches += req
      calls += s"watch ${req.getAfterSeq}"
      serverObs.setOnCancelHandler(() => lock.synchronized(watchers -= obs))
      events.filter(_.getSeq > req.getAfterSeq).foreach(obs.onNext)
      watchers += obs
    }
  }

  override def heartbeat(req: HeartbeatRequest, obs: StreamObserver[HeartbeatResponse]): Unit = {
    if (!authorized(req.getToken, obs)) return
    lock.synchronized(heartbeats += req)
    obs.onNext(HeartbeatResponse.newBuilder().setLeaseTtlMs(leaseTtlMs)
      .setIncarnation(heartbeatIncarnation.getOrElse(incarnation)).build())
    obs.onCompleted()
  }

  override def unregisterApplication(
      req: UnregisterApplicationRequest,
      obs: StreamObserver[UnregisterApplicationResponse]): Unit = {
    if (!authorized(req.getToken, obs)) return
    lock.synchronized {
      unregistrations += req
      calls += "unregister"
    }
    obs.onNext(UnregisterApplicationResponse.newBuilder().setRemovedExecutors(2).build())
    obs.onCompleted()
  }

  /** Appends an event (its seq is assigned here) and sends it to every watcher. */
  def emit(ev: WatchEvent): Long = lock.synchronized {
    val seq = events.size + 1L
    val withSeq = ev.toBuilder.setSeq(seq).build()
    events += withSeq
    watchers.toList.foreach { w =>
      try w.onNext(withSeq) catch { case _: Exception => watchers -= w }
    }
    seq
  }

  /** Sends an event to the watchers again without recording it (a duplicate delivery). */
  def resend(ev: WatchEvent): Unit = lock.synchronized {
    watchers.toList.foreach(w => try w.onNext(ev) catch { case _: Exception => })
  }

  /** Ends every event stream with an error. */
  def breakStreams(status: Status): Unit = lock.synchronized {
    watchers.toList.foreach(w => try w.onError(status.asRuntimeException()) catch {
      case _: Exception =>
    })
    watchers.clear()
  }
}

/** Runs a FakeStoker as an in-process server under a fixed name, and restarts it. */
class FakeStokerServer(val name: String) {
  @volatile private var server: Server = null
  @volatile var stoker: FakeStoker = null

  def start(s: FakeStoker): FakeStoker = {
    stoker = s
    server = InProcessServerBuilder.forName(name).addService(s).build().start()
    s
  }

  def stop(): Unit = {
    val srv = server
    if (srv != null) {
      srv.shutdownNow()
      srv.awaitTermination()
      server = null
    }
  }
}
