/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.net.InetAddress
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Path, Paths}

import scala.util.control.NonFatal

import io.grpc.{CallOptions, Channel, ClientCall, ClientInterceptor, ForwardingClientCall, Metadata, MethodDescriptor}

import org.apache.spark.{SparkConf, SparkException}

/**
 * The driver's Kubernetes identity, sent to stoker on every call as `authorization: Bearer
 * <token>`. A stoker with `--auth kubernetes` reviews it with the API server (TokenReview,
 * audience `stoker`), binds the application to that identity and creates its executor pods as
 * it.
 *
 * Where the token comes from, first match wins:
 *  - `spark.stoker.auth.token`: the token itself (for a driver outside the cluster, e.g. from
 *    `kubectl create token <sa> --audience stoker`; prefer the file, confs can be logged);
 *  - `spark.stoker.auth.tokenFile`: a file holding it, re-read whenever it changes (the kubelet
 *    rotates projected tokens);
 *  - `/var/run/secrets/stoker/token` when it exists: where the in-cluster example mounts a
 *    projected ServiceAccount token with audience `stoker`.
 *
 * A token is never sent in plaintext to an address that is not loopback: enable TLS
 * (`spark.stoker.tls.enabled`) or, knowingly, set `spark.stoker.auth.allowPlaintext=true`.
 */
private[spark] final class BearerToken private (literal: Option[String], file: Option[Path]) {
  @volatile private var cached: (Long, String) = (Long.MinValue, literal.orNull)

  /** Where it comes from, for messages. */
  def source: String = file.map(_.toString).getOrElse(StokerAuth.Token)

  /** The token now (the file is read again when its modification time changed). */
  def current(): String = file match {
    case None => cached._2
    case Some(path) =>
      val modified = try Files.getLastModifiedTime(path).toMillis catch {
        case NonFatal(e) => throw new SparkException(s"${StokerAuth.TokenFile}: cannot read $path: $e")
      }
      val (seen, token) = cached
      if (seen == modified && token != null) token
      else {
        val fresh = StokerAuth.readToken(path)
        cached = (modified, fresh)
        fresh
      }
  }
}

private[spark] object BearerToken {
  def literal(token: String): BearerToken = new BearerToken(Some(token), None)
  def file(path: Path): BearerToken = {
    val t = new BearerToken(None, Some(path))
    t.current() // fails now, with the key named, if the file is unusable
    t
  }
}

private[spark] object StokerAuth {
  val Token = "spark.stoker.auth.token"
  val TokenFile = "spark.stoker.auth.tokenFile"
  val AllowPlaintext = "spark.stoker.auth.allowPlaintext"
  val TlsEnabled = "spark.stoker.tls.enabled"
  val DefaultTokenFile = "/var/run/secrets/stoker/token"

  val AllKeys: Seq[String] = Seq(Token, TokenFile, AllowPlaintext)

  private val Authorization = Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER)

  private[stoker] def readToken(path: Path): String = {
    val text = try new String(Files.readAllBytes(path), StandardCharsets.UTF_8).trim catch {
      case NonFatal(e) => throw new SparkException(s"$TokenFile: cannot read $path: $e")
    }
    if (text.isEmpty) throw new SparkException(s"$TokenFile: $path is empty")
    if (text.exists(c => c.isWhitespace || c < 0x21 || c > 0x7e)) {
      throw new SparkException(s"$TokenFile: $path does not hold one token")
    }
    text
  }

  /** The configured token, if any (see [[BearerToken]]). */
  def fromConf(conf: SparkConf, defaultFile: String = DefaultTokenFile): Option[BearerToken] = {
    conf.getOption(Token).map(_.trim).filter(_.nonEmpty) match {
      case Some(t) => Some(BearerToken.literal(t))
      case None =>
        conf.getOption(TokenFile).map(_.trim).filter(_.nonEmpty) match {
          case Some(f) => Some(BearerToken.file(Paths.get(f)))
          case None =>
            val default = Paths.get(defaultFile)
            if (Files.isReadable(default)) Some(BearerToken.file(default)) else None
        }
    }
  }

  /** Refuses to send `token` in plaintext to an address that is not loopback. */
  def checkTransport(conf: SparkConf, master: StokerMaster, token: Option[BearerToken]): Unit = {
    if (token.isEmpty || conf.getBoolean(TlsEnabled, false) || conf.getBoolean(AllowPlaintext, false)) {
      return
    }
    val remote = master.endpoints.filterNot(e => isLoopback(e.host))
    if (remote.nonEmpty) {
      throw new SparkException(
        s"stoker: refusing to send the driver's Kubernetes token (${token.get.source}) in " +
          s"plaintext to ${remote.map(_.hostPort).mkString(",")}: enable TLS ($TlsEnabled) or " +
          s"set $AllowPlaintext=true")
    }
  }

  private def isLoopback(host: String): Boolean =
    host.equalsIgnoreCase("localhost") || (try {
      val addresses = InetAddress.getAllByName(host)
      addresses.nonEmpty && addresses.forall(_.isLoopbackAddress)
    } catch {
      case NonFatal(_) => false
    })

  /** Adds `authorization: Bearer <token>` to every call. */
  def interceptor(token: BearerToken): ClientInterceptor = new ClientInterceptor {
    override def interceptCall[Q, R](
        method: MethodDescriptor[Q, R],
        options: CallOptions,
        next: Channel): ClientCall[Q, R] =
      new ForwardingClientCall.SimpleForwardingClientCall[Q, R](next.newCall(method, options)) {
        override def start(listener: ClientCall.Listener[R], headers: Metadata): Unit = {
          headers.put(Authorization, s"Bearer ${token.current()}")
          super.start(listener, headers)
        }
      }
  }
}
