/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.io.ByteArrayInputStream
import java.net.Socket
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, NoSuchFileException, Path, Paths}
import java.nio.file.attribute.BasicFileAttributes
import java.security.{KeyFactory, KeyStore, Principal, PrivateKey, Signature}
import java.security.cert.{CertificateException, CertificateFactory, X509Certificate}
import java.security.spec.PKCS8EncodedKeySpec
import java.util.{Base64, Locale}
import java.util.concurrent.atomic.AtomicLong
import javax.net.ssl.{SSLEngine, TrustManagerFactory, X509ExtendedKeyManager, X509ExtendedTrustManager}

import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import io.grpc.netty.shaded.io.grpc.netty.{GrpcSslContexts, NettyChannelBuilder}
import io.grpc.netty.shaded.io.netty.handler.ssl.{SslContext, SslContextBuilder, SslProvider}

import org.apache.spark.{SparkConf, SparkException}
import org.apache.spark.internal.Logging

/**
 * TLS of the driver's channel to stoker (`spark.stoker.tls.*`, see [[StokerSettings]]).
 *
 * The CA file and the client certificate and key are read again when they change: every TLS
 * handshake (each new connection: the channel reconnects after stoker restarted, failed over or
 * dropped the connection) first compares the files' modification time, size and file key with
 * the last ones read, and re-reads them when any differs. So a driver whose mounted certificates
 * were rotated by cert-manager (or whose CA bundle was) uses the new ones from its next
 * connection on; an established connection keeps the session it negotiated. Chosen over
 * rebuilding the channel's SslContext: a gRPC channel keeps its SslContext for life, and the
 * session's calls and event stream would have to move to a new channel. A file that cannot be
 * read or parsed after a change keeps the previous content in use and is logged once.
 *
 * Netty's JDK TLS provider is used: the shaded jar cannot load netty-tcnative's native library
 * (its name no longer matches the relocated classes), so tests and drivers run the same code.
 */
private[spark] case class StokerTls(
    caFile: Option[String],
    certFile: Option[String],
    keyFile: Option[String]) {

  /** A client SslContext whose trust roots and client certificate follow the files. */
  def sslContext(): SslContext = {
    val builder = GrpcSslContexts.configure(SslContextBuilder.forClient(), SslProvider.JDK)
    caFile match {
      case Some(ca) => builder.trustManager(new StokerTls.ReloadingTrustManager(ca))
      case None => builder.trustManager(StokerTls.systemTrustManager())
    }
    (certFile, keyFile) match {
      case (Some(cert), Some(key)) => builder.keyManager(new StokerTls.ReloadingKeyManager(cert, key))
      case _ =>
    }
    builder.build()
  }
}

private[spark] object StokerTls extends Logging {
  val Enabled = "spark.stoker.tls.enabled"
  val CaFile = "spark.stoker.tls.caFile"
  val CertFile = "spark.stoker.tls.certFile"
  val KeyFile = "spark.stoker.tls.keyFile"

  val AllKeys: Seq[String] = Seq(Enabled, CaFile, CertFile, KeyFile)

  /**
   * The TLS settings (see [[StokerSettings]]): None unless `spark.stoker.tls.enabled` is true.
   * Every file must be a readable regular file; a value that cannot be used is a SparkException
   * that names its key.
   */
  def fromConf(conf: SparkConf): Option[StokerTls] = {
    val enabled = conf.getOption(Enabled).map(_.trim.toLowerCase(Locale.ROOT)) match {
      case None | Some("false") => false
      case Some("true") => true
      case Some(_) =>
        throw new SparkException(s"$Enabled: '${conf.get(Enabled)}' is not true or false")
    }
    val files = Seq(CaFile, CertFile, KeyFile).filter(conf.contains)
    if (!enabled) {
      if (files.nonEmpty) {
        throw new SparkException(s"${files.mkString(", ")} set but $Enabled is not true: set " +
          s"$Enabled=true to speak TLS to stoker, or remove them")
      }
      return None
    }
    def file(key: String): Option[String] = conf.getOption(key).map(_.trim).map { path =>
      if (path.isEmpty) throw new SparkException(s"$key: empty path")
      val p = Paths.get(path)
      if (!Files.isRegularFile(p)) throw new SparkException(s"$key: '$path' is not a file")
      if (!Files.isReadable(p)) throw new SparkException(s"$key: '$path' cannot be read")
      path
    }
    val tls = StokerTls(file(CaFile), file(CertFile), file(KeyFile))
    if (tls.certFile.isDefined != tls.keyFile.isDefined) {
      val (set, missing) = if (tls.certFile.isDefined) (CertFile, KeyFile) else (KeyFile, CertFile)
      throw new SparkException(s"$set is set but $missing is not: a client certificate needs both")
    }
    Some(tls)
  }

  /** The channel to `master`: plaintext, or TLS with `tls`. */
  def channelBuilder(master: StokerMaster, tls: Option[StokerTls]): NettyChannelBuilder = {
    val builder = NettyChannelBuilder.forTarget(master.grpcTarget)
    tls match {
      case None => builder.usePlaintext()
      case Some(t) => builder.useTransportSecurity().sslContext(t.sslContext())
    }
  }

  /** The JVM's default trust store. */
  private[stoker] def systemTrustManager(): X509ExtendedTrustManager = {
    val factory = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm)
    factory.init(null: KeyStore)
    firstX509(factory)
  }

  private def firstX509(factory: TrustManagerFactory): X509ExtendedTrustManager =
    factory.getTrustManagers.collectFirst { case t: X509ExtendedTrustManager => t }
      .getOrElse(throw new IllegalStateException("no X.509 trust manager"))

  /** What identifies a file's content without reading it. */
  private case class Stamp(modified: Long, size: Long, key: Any)

  private def stamp(path: Path): Stamp = {
    val attrs = Files.readAttributes(path, classOf[BasicFileAttributes])
    Stamp(attrs.lastModifiedTime.toMillis, attrs.size, attrs.fileKey)
  }

  /**
   * The value parsed from some files, parsed again when any file's [[Stamp]] changed. The first
   * load throws a SparkException that names the conf key; later failures keep the last value
   * and are logged once per change.
   */
  private class Reloading[T](files: Seq[(String, Path)], parse: Seq[Array[Byte]] => T) {
    private var stamps: Seq[Stamp] = Nil
    private var value: T = try {
      stamps = stampAll()
      parse(files.map { case (_, p) => Files.readAllBytes(p) })
    } catch {
      case e: SparkException => throw e
      case NonFatal(e) => throw new SparkException(s"$keys: cannot use $paths: ${message(e)}", e)
    }

    private def keys: String = files.map(_._1).mkString(", ")
    private def paths: String = files.map(_._2).mkString(", ")
    private def stampAll(): Seq[Stamp] = files.map { case (_, p) => stamp(p) }

    def current(): T = synchronized {
      try {
        val now = stampAll()
        if (now != stamps) {
          stamps = now
          value = parse(files.map { case (_, p) => Files.readAllBytes(p) })
          logInfo(s"stoker: reloaded $paths ($keys)")
        }
      } catch {
        case NonFatal(e) =>
          logWarning(s"stoker: $paths ($keys) changed but cannot be used, keeping the previous " +
            s"content: ${message(e)}")
      }
      value
    }
  }

  private def message(e: Throwable): String = e match {
    case _: NoSuchFileException => s"no such file: ${e.getMessage}"
    case _ => Option(e.getMessage).getOrElse(e.getClass.getSimpleName)
  }

  /** Trust roots from a PEM file, re-read when it changes. */
  private[stoker] class ReloadingTrustManager(caFile: String) extends X509ExtendedTrustManager {
    private val roots = new Reloading(Seq(CaFile -> Paths.get(caFile)), bytes => {
      val certs = parseCertificates(CaFile, bytes.head)
      val store = KeyStore.getInstance(KeyStore.getDefaultType)
      store.load(null, null)
      certs.zipWithIndex.foreach { case (c, i) => store.setCertificateEntry(s"ca-$i", c) }
      val factory = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm)
      factory.init(store)
      firstX509(factory)
    })

    override def checkServerTrusted(chain: Array[X509Certificate], authType: String,
        engine: SSLEngine): Unit = roots.current().checkServerTrusted(chain, authType, engine)
    override def checkServerTrusted(chain: Array[X509Certificate], authType: String,
        socket: Socket): Unit = roots.current().checkServerTrusted(chain, authType, socket)
    override def checkServerTrusted(chain: Array[X509Certificate], authType: String): Unit =
      roots.current().checkServerTrusted(chain, authType)
    override def checkClientTrusted(chain: Array[X509Certificate], authType: String,
        engine: SSLEngine): Unit = refuseClients()
    override def checkClientTrusted(chain: Array[X509Certificate], authType: String,
        socket: Socket): Unit = refuseClients()
    override def checkClientTrusted(chain: Array[X509Certificate], authType: String): Unit =
      refuseClients()
    override def getAcceptedIssuers: Array[X509Certificate] = roots.current().getAcceptedIssuers

    private def refuseClients(): Nothing =
      throw new CertificateException("stoker's trust manager verifies servers only")
  }

  /** One client certificate and key from PEM files, re-read when either changes. */
  private[stoker] class ReloadingKeyManager(certFile: String, keyFile: String)
      extends X509ExtendedKeyManager {
    private case class Identity(alias: String, chain: Array[X509Certificate], key: PrivateKey)

    private val generation = new AtomicLong()
    /**
     * The current identity and the one before it, newest first: a handshake that picked an
     * alias just before a reload still gets that alias's certificate and key.
     */
    @volatile private var known: List[Identity] = Nil
    private val identity = new Reloading(
      Seq(CertFile -> Paths.get(certFile), KeyFile -> Paths.get(keyFile)), bytes => {
        val chain = parseCertificates(CertFile, bytes(0)).toArray
        val key = parsePrivateKey(bytes(1))
        if (!keyMatches(chain.head, key)) {
          throw new SparkException(s"$KeyFile: the key $keyFile is not the key of the " +
            s"certificate $certFile ($CertFile)")
        }
        Identity(s"stoker-client-${generation.incrementAndGet()}", chain, key)
      })

    private def current(): Identity = synchronized {
      val id = identity.current()
      if (!known.headOption.exists(_.alias == id.alias)) known = (id :: known).take(2)
      id
    }

    private def byAlias(alias: String): Option[Identity] = {
      current()
      known.find(_.alias == alias)
    }

    private def choose(keyTypes: Array[String]): String = {
      val id = current()
      if (keyTypes == null || keyTypes.contains(id.key.getAlgorithm)) id.alias else null
    }

    override def chooseClientAlias(keyTypes: Array[String], issuers: Array[Principal],
        socket: Socket): String = choose(keyTypes)
    override def chooseEngineClientAlias(keyTypes: Array[String], issuers: Array[Principal],
        engine: SSLEngine): String = choose(keyTypes)
    override def getClientAliases(keyType: String, issuers: Array[Principal]): Array[String] =
      Option(choose(Array(keyType))).toArray
    override def getCertificateChain(alias: String): Array[X509Certificate] =
      byAlias(alias).map(_.chain.clone()).orNull
    override def getPrivateKey(alias: String): PrivateKey = byAlias(alias).map(_.key).orNull
    override def getServerAliases(keyType: String, issuers: Array[Principal]): Array[String] = null
    override def chooseServerAlias(keyType: String, issuers: Array[Principal],
        socket: Socket): String = null
    override def chooseEngineServerAlias(keyType: String, issuers: Array[Principal],
        engine: SSLEngine): String = null
  }

  /** The X.509 certificates of a PEM file: at least one. */
  private[stoker] def parseCertificates(key: String, pem: Array[Byte]): Seq[X509Certificate] = {
    val certs = try {
      CertificateFactory.getInstance("X.509")
        .generateCertificates(new ByteArrayInputStream(pem)).asScala.toSeq
        .collect { case c: X509Certificate => c }
    } catch {
      case e: CertificateException =>
        throw new SparkException(s"$key: not a PEM certificate file (${message(e)})", e)
    }
    if (certs.isEmpty) throw new SparkException(s"$key: the file holds no certificate")
    certs
  }

  private val PemBlock = "(?s)-----BEGIN ([A-Z ]+)-----(.*?)-----END \\1-----".r

  /**
   * A private key from PEM: PKCS#8 (`PRIVATE KEY`), PKCS#1 RSA (`RSA PRIVATE KEY`) or SEC1 EC
   * (`EC PRIVATE KEY`, cert-manager's default encoding for ECDSA keys). Encrypted keys are
   * refused.
   */
  private[stoker] def parsePrivateKey(pem: Array[Byte]): PrivateKey = {
    val text = new String(pem, StandardCharsets.US_ASCII)
    val blocks = PemBlock.findAllMatchIn(text).map(m => m.group(1) -> m.group(2)).toSeq
    def der(body: String): Array[Byte] = Base64.getMimeDecoder.decode(body.trim)
    val (pkcs8, algorithms) = blocks.collectFirst {
      case ("PRIVATE KEY", body) => (der(body), Seq("RSA", "EC", "Ed25519", "EdDSA"))
      case ("RSA PRIVATE KEY", body) => (Der.rsaPkcs8(der(body)), Seq("RSA"))
      case ("EC PRIVATE KEY", body) => (Der.ecPkcs8(der(body)), Seq("EC"))
    }.getOrElse {
      val found = blocks.map(_._1).distinct
      throw new SparkException(s"$KeyFile: no unencrypted private key (PRIVATE KEY, " +
        s"RSA PRIVATE KEY or EC PRIVATE KEY PEM block) in the file" +
        (if (found.nonEmpty) s"; found ${found.mkString(", ")}" else ""))
    }
    algorithms.iterator.flatMap { algorithm =>
      try Some(KeyFactory.getInstance(algorithm).generatePrivate(new PKCS8EncodedKeySpec(pkcs8)))
      catch { case NonFatal(_) => None }
    }.nextOption().getOrElse {
      throw new SparkException(s"$KeyFile: the private key is not an RSA, EC or EdDSA key " +
        "this JVM can read")
    }
  }

  /** Whether `key` signs what the certificate's public key verifies. */
  private def keyMatches(cert: X509Certificate, key: PrivateKey): Boolean = {
    val algorithm = key.getAlgorithm match {
      case "RSA" => "SHA256withRSA"
      case "EC" => "SHA256withECDSA"
      case other => other
    }
    try {
      val data = "stoker".getBytes(StandardCharsets.US_ASCII)
      val signer = Signature.getInstance(algorithm)
      signer.initSign(key)
      signer.update(data)
      val signature = signer.sign()
      val verifier = Signature.getInstance(algorithm)
      verifier.initVerify(cert.getPublicKey)
      verifier.update(data)
      verifier.verify(signature)
    } catch {
      case NonFatal(_) => false
    }
  }

  /** Just enough DER to wrap PKCS#1 and SEC1 keys into PKCS#8. */
  private object Der {
    private val RsaOid = Array[Byte](0x06, 0x09, 0x2a, 0x86.toByte, 0x48, 0x86.toByte, 0xf7.toByte,
      0x0d, 0x01, 0x01, 0x01)
    private val EcOid = Array[Byte](0x06, 0x07, 0x2a, 0x86.toByte, 0x48, 0xce.toByte, 0x3d, 0x02,
      0x01)
    private val Version0 = Array[Byte](0x02, 0x01, 0x00)
    private val Null = Array[Byte](0x05, 0x00)

    def rsaPkcs8(pkcs1: Array[Byte]): Array[Byte] =
      tlv(0x30, Version0 ++ tlv(0x30, RsaOid ++ Null) ++ tlv(0x04, pkcs1))

    /** SEC1 `ECPrivateKey` carries its curve in `[0] parameters`; PKCS#8 wants it outside. */
    def ecPkcs8(sec1: Array[Byte]): Array[Byte] = {
      val fields = children(sec1)
      val curve = fields.collectFirst { case (0xa0, content) => content }.getOrElse {
        throw new SparkException(s"$KeyFile: the EC PRIVATE KEY names no curve; use a PKCS#8 " +
          "key (cert-manager: privateKey.encoding: PKCS8)")
      }
      tlv(0x30, Version0 ++ tlv(0x30, EcOid ++ curve) ++ tlv(0x04, sec1))
    }

    private def tlv(tag: Int, content: Array[Byte]): Array[Byte] =
      Array(tag.toByte) ++ length(content.length) ++ content

    private def length(n: Int): Array[Byte] =
      if (n < 0x80) Array(n.toByte)
      else {
        val bytes = BigInt(n).toByteArray.dropWhile(_ == 0)
        Array((0x80 | bytes.length).toByte) ++ bytes
      }

    /** The (tag, content) elements inside a SEQUENCE. */
    private def children(der: Array[Byte]): Seq[(Int, Array[Byte])] = {
      def read(at: Int): (Int, Int, Int) = { // tag, content start, content length
        val tag = der(at) & 0xff
        val first = der(at + 1) & 0xff
        if (first < 0x80) (tag, at + 2, first)
        else {
          val count = first & 0x7f
          val len = (0 until count).foldLeft(0)((acc, i) => (acc << 8) | (der(at + 2 + i) & 0xff))
          (tag, at + 2 + count, len)
        }
      }
      try {
        val (seqTag, start, len) = read(0)
        if (seqTag != 0x30) throw new SparkException(s"$KeyFile: the EC PRIVATE KEY is not DER")
        val out = Seq.newBuilder[(Int, Array[Byte])]
        var at = start
        while (at < start + len) {
          val (tag, contentStart, contentLen) = read(at)
          out += tag -> der.slice(contentStart, contentStart + contentLen)
          at = contentStart + contentLen
        }
        out.result()
      } catch {
        case e: IndexOutOfBoundsException =>
          throw new SparkException(s"$KeyFile: the EC PRIVATE KEY is truncated", e)
      }
    }
  }
}
