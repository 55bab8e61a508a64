/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.net.{URI, URISyntaxException}
import java.util.Locale

import org.apache.spark.{SparkConf, SparkException}

/** One stoker server address. */
private[spark] case class StokerEndpoint(host: String, port: Int) {

  /** `host:port`, with IPv6 literals in brackets. */
  def hostPort: String = if (host.contains(":")) s"[$host]:$port" else s"$host:$port"
}

/**
 * Where the stoker servers are: parsed from the Spark master URL. Several comma-separated
 * addresses name the replicas of one stoker with leader election
 * (`spark+stoker://h1:7077,h2:7077`, like Spark standalone's HA masters): only the leader listens,
 * and the driver's channel connects to whichever address accepts, in order, again after a
 * failover.
 */
private[spark] case class StokerMaster(endpoints: Seq[StokerEndpoint]) {
  require(endpoints.nonEmpty, "a stoker master needs an address")

  /** The first address's host. */
  def host: String = endpoints.head.host

  /** The first address's port. */
  def port: Int = endpoints.head.port

  /** The addresses as `host:port[,host:port...]`, for messages. */
  def hostPort: String = endpoints.map(_.hostPort).mkString(",")

  /**
   * The gRPC target: DNS resolution that is redone when connections fail; for several
   * addresses, [[StokerEndpointsResolver]] (all of them, in order, each resolved by DNS).
   */
  def grpcTarget: String =
    if (endpoints.size == 1) s"dns:///${endpoints.head.hostPort}"
    else StokerEndpointsResolver.target(endpoints)
}

private[spark] object StokerMaster {
  /** The schemes the plugin answers to. `spark+stoker` passes spark-submit's master check. */
  val Schemes: Seq[String] = Seq("spark+stoker", "stoker")

  private val Expected = "expected spark+stoker://host:port[,host:port...] or stoker://host:port"

  /** One address. */
  def apply(host: String, port: Int): StokerMaster = StokerMaster(Seq(StokerEndpoint(host, port)))

  /** Whether a master URL is meant for stoker (the scheme alone decides; see [[parse]]). */
  def isStokerUrl(masterURL: String): Boolean = {
    masterURL != null && {
      val lower = masterURL.trim.toLowerCase(Locale.ROOT)
      Schemes.exists(s => lower.startsWith(s + "://"))
    }
  }

  /**
   * Parses `spark+stoker://host:port` or `stoker://host:port` (host may be a name, an IPv4
   * address or a bracketed IPv6 address), or several comma-separated `host:port` after the
   * scheme. Anything else is an `IllegalArgumentException` that says what was expected.
   */
  def parse(masterURL: String): StokerMaster = {
    def bad(why: String): Nothing =
      throw new IllegalArgumentException(s"Invalid stoker master URL '$masterURL': $why ($Expected)")

    if (!isStokerUrl(masterURL)) bad("unknown scheme")
    val trimmed = masterURL.trim
    val separator = trimmed.indexOf("://")
    val scheme = trimmed.substring(0, separator)
    val rest = trimmed.substring(separator + 3)
    if (!rest.contains(",")) return StokerMaster(Seq(parseOne(trimmed, bad)))
    val parts = rest.stripSuffix("/").split(",", -1).toSeq
    if (parts.exists(_.trim.isEmpty)) bad("an empty address in the list")
    val endpoints = parts.map(part => parseOne(s"$scheme://${part.trim}", bad))
    if (endpoints.distinct.size != endpoints.size) bad("an address is listed twice")
    StokerMaster(endpoints)
  }

  private def parseOne(url: String, bad: String => Nothing): StokerEndpoint = {
    val uri = try new URI(url) catch {
      case e: URISyntaxException => bad(e.getMessage)
    }
    if (uri.getRawUserInfo != null) bad("user information is not supported")
    if (uri.getRawQuery != null || uri.getRawFragment != null) {
      bad("a query or fragment is not supported")
    }
    val path = uri.getRawPath
    if (path != null && path.nonEmpty && path != "/") bad(s"unexpected path '$path'")
    val rawHost = uri.getHost
    if (rawHost == null || rawHost.isEmpty) bad("missing or malformed host")
    if (uri.getPort == -1) bad("missing port")
    if (uri.getPort < 1 || uri.getPort > 65535) bad(s"port ${uri.getPort} out of range")
    StokerEndpoint(rawHost.stripPrefix("[").stripSuffix("]"), uri.getPort)
  }
}

/**
 * The plugin's own settings. Every key is optional.
 *
 *  - `spark.stoker.registration.timeout` (default 60s): how long `SparkContext` start-up keeps
 *    trying to register the application with stoker before failing with a clear error.
 *  - `spark.stoker.rpc.timeout` (default 5s): deadline of each unary call to stoker
 *    (RegisterApplication attempt, RequestTotalExecutors, KillExecutors, DecommissionExecutors,
 *    Heartbeat).
 *  - `spark.stoker.rpc.retryTimeout` (default 30s): how long a request made by Spark (new totals,
 *    kills, decommissions) keeps being retried while stoker is unreachable before the Future
 *    Spark waits on completes with `false`. Keep it below `spark.rpc.askTimeout` (120s).
 *  - `spark.stoker.unregister.timeout` (default 10s): deadline of UnregisterApplication when the
 *    SparkContext stops.
 *  - `spark.stoker.reconnect.initialBackoff` (default 100ms) and
 *    `spark.stoker.reconnect.maxBackoff` (default 5s): the jittered exponential backoff between
 *    attempts to re-attach to stoker after the event stream or a heartbeat failed.
 *  - `spark.stoker.heartbeat.interval` (default: a third of the lease TTL stoker returns): how
 *    often the driver renews its lease. Never more than a third of the lease TTL.
 *  - `spark.stoker.auth.token`, `spark.stoker.auth.tokenFile`,
 *    `spark.stoker.auth.allowPlaintext`: the driver's Kubernetes token (see [[StokerAuth]]).
 *  - `spark.stoker.tls.enabled` (default false): speak TLS to stoker (`stoker serve --tls-cert
 *    --tls-key`). The server's certificate must name the master URL's host (each host, with
 *    several addresses).
 *  - `spark.stoker.tls.caFile` (default: the JVM's trust store): PEM file of the CA
 *    certificates that stoker's certificate must chain to.
 *  - `spark.stoker.tls.certFile` and `spark.stoker.tls.keyFile`: PEM client certificate (chain)
 *    and its private key (PKCS#8, PKCS#1 RSA or SEC1 EC), for a stoker started with
 *    `--tls-client-ca`. Both or neither.
 *
 *  The TLS files are read again when they change (modification time, size or file identity),
 *  checked at every new connection to stoker: rotated certificates are used from the next
 *  connection on (see [[StokerTls]]). A changed file that cannot be used keeps the previous one
 *  in use (logged). The file keys need `spark.stoker.tls.enabled=true`.
 */
private[spark] case class StokerSettings(
    registrationTimeoutMs: Long = 60000L,
    rpcTimeoutMs: Long = 5000L,
    retryTimeoutMs: Long = 30000L,
    unregisterTimeoutMs: Long = 10000L,
    initialBackoffMs: Long = 100L,
    maxBackoffMs: Long = 5000L,
    heartbeatIntervalMs: Option[Long] = None,
    auth: Option[BearerToken] = None,
    tls: Option[StokerTls] = None)

private[spark] object StokerSettings {
  val RegistrationTimeout = "spark.stoker.registration.timeout"
  val RpcTimeout = "spark.stoker.rpc.timeout"
  val RetryTimeout = "spark.stoker.rpc.retryTimeout"
  val UnregisterTimeout = "spark.stoker.unregister.timeout"
  val InitialBackoff = "spark.stoker.reconnect.initialBackoff"
  val MaxBackoff = "spark.stoker.reconnect.maxBackoff"
  val HeartbeatInterval = "spark.stoker.heartbeat.interval"

  val AllKeys: Seq[String] = Seq(RegistrationTimeout, RpcTimeout, RetryTimeout, UnregisterTimeout,
    InitialBackoff, MaxBackoff, HeartbeatInterval) ++ StokerAuth.AllKeys ++ StokerTls.AllKeys

  def fromConf(conf: SparkConf): StokerSettings = {
    def positiveMs(key: String, default: String): Long = {
      val v = try conf.getTimeAsMs(key, default) catch {
        case e: NumberFormatException =>
          throw new SparkException(s"$key: '${conf.get(key)}' is not a duration (${e.getMessage})")
      }
      if (v <= 0) throw new SparkException(s"$key: must be positive, got '${conf.get(key)}'")
      v
    }
    val initial = positiveMs(InitialBackoff, "100ms")
    val max = positiveMs(MaxBackoff, "5s")
    StokerSettings(
      registrationTimeoutMs = positiveMs(RegistrationTimeout, "60s"),
      rpcTimeoutMs = positiveMs(RpcTimeout, "5s"),
      retryTimeoutMs = positiveMs(RetryTimeout, "30s"),
      unregisterTimeoutMs = positiveMs(UnregisterTimeout, "10s"),
      initialBackoffMs = initial,
      maxBackoffMs = math.max(initial, max),
      heartbeatIntervalMs =
        if (conf.contains(HeartbeatInterval)) Some(positiveMs(HeartbeatInterval, "10s")) else None,
      auth = StokerAuth.fromConf(conf),
      tls = StokerTls.fromConf(conf))
  }
}
