package org.apache.spark.scheduler.cluster.stoker

import scala.reflect.ClassTag

import org.opentest4j.AssertionFailedError

/** Small assertion helpers for JUnit 5 tests written in Scala. */
trait Checks {
  def eq[T](expected: T, actual: T, what: String = ""): Unit = {
    if (expected != actual) {
      throw new AssertionFailedError(
        s"${if (what.nonEmpty) what + ": " else ""}expected <$expected> but was <$actual>",
        expected, actual)
    }
  }

  def check(cond: Boolean, what: => String): Unit =
    if (!cond) throw new AssertionFailedError(what)

  def intercept[E <: Throwable](body: => Any)(implicit ct: ClassTag[E]): E = {
    val caught = try {
      body
      None
    } catch {
      case e: Throwable if ct.runtimeClass.isInstance(e) => Some(e.asInstanceOf[E])
    }
    caught.getOrElse(throw new AssertionFailedError(
      s"expected ${ct.runtimeClass.getName} to be thrown"))
  }

  /** Waits until `cond` holds, failing with `what` after `timeoutMs`. */
  def eventually(what: => String, timeoutMs: Long = 10000)(cond: => Boolean): Unit = {
    val deadline = System.nanoTime() + timeoutMs * 1000000L
    while (!cond) {
      if (System.nanoTime() > deadline) throw new AssertionFailedError(s"timed out: $what")
      Thread.sleep(10)
    }
  }
}
