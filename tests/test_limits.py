"""
Unit tests for L{twisted_lab.services.limits}: token buckets, failure throttles that
reserve before they spend, and bookkeeping that stays small and cheap.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.services.limits import FailureThrottle, TokenBucket


class FailureThrottleTests(SynchronousTestCase):
    def test_backoffAfterFreeFailures(self) -> None:
        clock = Clock()
        throttle = FailureThrottle(clock, free=3, base=1.0, cap=10.0, forgetAfter=60)
        for _ in range(3):
            throttle.failed("k")
            self.assertEqual(throttle.retryAfter("k"), 0)
        throttle.failed("k")
        self.assertEqual(throttle.retryAfter("k"), 1.0)
        throttle.failed("k")
        self.assertEqual(throttle.retryAfter("k"), 2.0)
        for _ in range(20):
            throttle.failed("k")
        self.assertEqual(throttle.retryAfter("k"), 10.0, "capped")
        clock.advance(10)
        self.assertEqual(throttle.retryAfter("k"), 0, "never locked out for good")
        clock.advance(61)
        throttle.failed("k")
        self.assertEqual(throttle.retryAfter("k"), 0, "forgotten after a quiet hour")

    def test_successClears(self) -> None:
        clock = Clock()
        throttle = FailureThrottle(clock, free=1)
        throttle.failed("k")
        throttle.failed("k")
        self.assertGreater(throttle.retryAfter("k"), 0)
        throttle.succeeded("k")
        self.assertEqual(throttle.retryAfter("k"), 0)

    def test_concurrentAttemptsCountAsTheyStart(self) -> None:
        """
        Attempts reserved before any of them finished count at once: with
        5 free failures, of 300 attempts started together 6 may run (the
        sixth starts the back-off) and 294 are refused before any hash.
        """
        throttle = FailureThrottle(Clock(), free=5)
        started = [throttle.reserve("alice") for _ in range(300)]
        self.assertEqual(started.count(0.0), 6)
        self.assertTrue(all(wait > 0 for wait in started[6:]))

    def test_releaseGivesTheAttemptBack(self) -> None:
        """
        A reserved attempt that succeeds (or could not be made) is taken
        back, so successful logins from one address never add up to a
        block; a failure keeps it.
        """
        throttle = FailureThrottle(Clock(), free=2)
        for _ in range(50):
            self.assertEqual(throttle.reserve("10.0.0.1"), 0)
            throttle.release("10.0.0.1")
        self.assertEqual(len(throttle), 0)
        for _ in range(3):
            throttle.reserve("10.0.0.1")
        self.assertGreater(throttle.retryAfter("10.0.0.1"), 0)
        throttle.release("10.0.0.1")
        self.assertEqual(throttle.retryAfter("10.0.0.1"), 0, "back within the free")

    def test_manyKeysStayBoundedAndCheap(self) -> None:
        """
        An attacker failing on ever new names cannot grow the throttle past
        its bound (pruning only ever looks at the oldest keys, so each
        failure costs the same however many there are).
        """
        clock = Clock()
        throttle = FailureThrottle(clock, free=3, forgetAfter=60, maxKeys=1000)
        for i in range(20_000):
            throttle.failed(f"name{i}")
        self.assertEqual(len(throttle), 1000)
        self.assertEqual(throttle.retryAfter("name19999"), 0)
        clock.advance(61)
        throttle.failed("one more")
        self.assertEqual(len(throttle), 1, "stale keys pruned from the front")


class TokenBucketTests(SynchronousTestCase):
    def test_takeAndRefill(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, burst=2, rate=0.5)
        self.assertEqual(bucket.take("a"), 0)
        self.assertEqual(bucket.take("a"), 0)
        self.assertEqual(bucket.take("a"), 2.0)
        self.assertEqual(bucket.take("b"), 0, "per key")
        clock.advance(2)
        self.assertEqual(bucket.take("a"), 0)

    def test_refilledKeysAreForgotten(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, burst=2, rate=1.0, maxKeys=100)
        for i in range(5000):
            bucket.take(f"10.0.{i // 256}.{i % 256}")
        self.assertLessEqual(len(bucket), 100)
        clock.advance(10)
        bucket.take("one more")
        self.assertEqual(len(bucket), 1)

    def test_rejectsNonsense(self) -> None:
        self.assertRaises(ValueError, TokenBucket, Clock(), burst=0, rate=1.0)
        self.assertRaises(ValueError, TokenBucket, Clock(), burst=1, rate=0.0)
