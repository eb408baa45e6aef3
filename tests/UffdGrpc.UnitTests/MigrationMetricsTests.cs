using System.Diagnostics;
using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>
/// The migration metrics' stamps: queued (raised → read), handling (read → the resolving
/// call received), waking (call received → woken); the outcome a failed fill gives the wake
/// that follows; the counters of the resolving calls.
/// </summary>
public class MigrationMetricsTests
{
    private static (Machine M, ulong A, UserfaultfdCtx Ctx) Registered(ulong pages = 1, ulong mode = Uapi.RegisterModeMissing, UffdFeatures features = UffdFeatures.None)
    {
        var m = new Machine();
        var a = m.Map(pages);
        var ctx = m.Uffd(features);
        Assert.Equal(Errno.OK, ctx.Register(a, pages * Machine.Pg, mode, out _));
        return (m, a, ctx);
    }

    private static LatencyDistribution Only(MigrationStats s, FaultPhase phase) =>
        Assert.Single(s.Distributions(), d => d.Phase == phase);

    private static int BucketOfOnlySample(LatencyDistribution d)
    {
        Assert.Equal(1, d.Count);
        return Array.FindIndex(d.Counts, c => c == 1);
    }

    [Theory]
    [InlineData(0.0, 0)]
    [InlineData(1.9, 0)]
    [InlineData(2.0, 1)]
    [InlineData(4095.9, 11)]
    [InlineData(4096.0, 12)]
    [InlineData(8191.0, 12)]
    [InlineData(8192.0, 13)]
    [InlineData(1e12, 32)]
    public void Buckets_are_powers_of_two_microseconds(double micros, int bucket) =>
        Assert.Equal(bucket, MigrationStats.BucketOf(micros));

    /// <summary>Model time: a clock the test advances, in microseconds.</summary>
    private sealed class ModelClock
    {
        public long Micros;

        public long Ticks() => Micros * Stopwatch.Frequency / 1_000_000;
    }

    private static ModelClock Clocked(Machine m)
    {
        var c = new ModelClock { Micros = 1_000_000 };
        m.K.Clock = c.Ticks;
        return c;
    }

    [Fact]
    public void A_handler_that_takes_5_ms_before_its_call_moves_only_the_handling_phase()
    {
        var (m, a, ctx) = Registered();
        var clock = Clocked(m);
        var read = m.Read(a);
        clock.Micros += 30;
        Assert.Equal(Errno.OK, ctx.Read(out _));
        // The handler's 5 ms, then its call arrives and is served 20 µs later.
        clock.Micros += 5000;
        var arrived = clock.Ticks();
        clock.Micros += 20;
        m.K.Locked(() =>
        {
            m.K.CallReceivedAt = arrived;
            Assert.Equal(Errno.OK, ctx.Zeropage(a, Machine.Pg, 0).Errno);
            m.K.CallReceivedAt = 0;
        });
        Assert.True(read.IsCompleted);

        foreach (var s in new[] { m.K.Migration, m.Mm.Migration })
        {
            Assert.All(s.Distributions(), d => Assert.Equal((UserfaultClass.Missing, UserfaultOutcome.Zeropage), (d.Class, d.Outcome)));
            Assert.Equal(12, BucketOfOnlySample(Only(s, FaultPhase.Handling)));
            Assert.Equal(4, BucketOfOnlySample(Only(s, FaultPhase.Queued)));
            Assert.Equal(4, BucketOfOnlySample(Only(s, FaultPhase.Waking)));
            Assert.Equal(12, BucketOfOnlySample(Only(s, FaultPhase.Total)));
            Assert.Equal(5050, Only(s, FaultPhase.Total).SumMicros, tolerance: 1);
            Assert.Equal((1, 1, 1, 1), (s.FaultsRaised, s.FaultsEnded, s.PagesMoved, s.RoundTrips));
            Assert.Equal(0, s.BytesMoved);
        }
    }

    [Fact]
    public void A_thread_asleep_10_ms_of_model_time_while_another_runs_blocks_the_process_for_0()
    {
        var (m, a, ctx) = Registered();
        var clock = Clocked(m);
        var other = m.K.CreateThread(m.Mm);
        var read = m.Read(a);
        clock.Micros += 10_000;
        ctx.Zeropage(a, Machine.Pg, 0);
        Assert.True(read.IsCompleted);
        Assert.Equal(TimeSpan.FromMilliseconds(10), m.T.Blocktime);
        Assert.Equal(TimeSpan.Zero, other.Blocktime);
        Assert.Equal(TimeSpan.Zero, m.Mm.Blocktime);
    }

    [Fact]
    public void Time_between_the_call_arriving_and_the_wake_is_the_waking_phase()
    {
        var (m, a, ctx) = Registered();
        var clock = Clocked(m);
        var read = m.Read(a);
        Assert.Equal(Errno.OK, ctx.Read(out _));
        clock.Micros += 100;
        m.K.Locked(() =>
        {
            // The call arrived 5 ms before it got the machine (it waited for the lock).
            m.K.CallReceivedAt = clock.Ticks();
            clock.Micros += 5000;
            ctx.Copy(a, new byte[Machine.Pg], 0x1000, Machine.Pg, 0);
            m.K.CallReceivedAt = 0;
        });
        Assert.True(read.IsCompleted);
        Assert.Equal(12, BucketOfOnlySample(Only(m.K.Migration, FaultPhase.Waking)));
        Assert.Equal(6, BucketOfOnlySample(Only(m.K.Migration, FaultPhase.Handling)));
        Assert.Equal(0, BucketOfOnlySample(Only(m.K.Migration, FaultPhase.Queued)));
        Assert.Equal(4096, m.K.Migration.BytesMoved);
    }

    [Fact]
    public void A_fault_never_read_has_only_waking_and_total()
    {
        var (m, a, ctx) = Registered();
        var read = m.Read(a);
        ctx.Zeropage(a, Machine.Pg, 0);
        Assert.True(read.IsCompleted);
        Assert.Equal([FaultPhase.Waking, FaultPhase.Total], m.K.Migration.Distributions().Select(d => d.Phase));
    }

    [Fact]
    public void A_copy_that_meets_an_existing_page_wakes_nothing_and_the_wake_after_it_is_reported_as_eexist()
    {
        var (m, a, ctx) = Registered();
        var read = m.Read(a);
        Assert.Equal(Errno.OK, ctx.Zeropage(a, Machine.Pg, Uapi.ZeropageModeDontwake).Errno);
        var copy = ctx.Copy(a, new byte[Machine.Pg], 0x1000, Machine.Pg, 0);
        Assert.Equal(Errno.EEXIST, copy.Errno);
        // userfaultfd_copy: ret < 0 skips wake_userfault.
        Assert.False(read.IsCompleted);
        Assert.Equal(Errno.OK, ctx.Wake(a, Machine.Pg));
        Assert.True(read.IsCompleted);

        var s = m.K.Migration;
        Assert.All(s.Distributions(), d => Assert.Equal(UserfaultOutcome.Eexist, d.Outcome));
        Assert.Equal((1L, 3L, 1L, 0L), (s.PagesMoved, s.RoundTrips, s.FillsEexist, s.FillsEagain));
    }

    [Fact]
    public void A_wake_without_a_failed_fill_is_a_wake_and_an_unprotect_is_unwp_of_a_wp_fault()
    {
        var (m, a, ctx) = Registered(2, Uapi.RegisterModeMissing | Uapi.RegisterModeWp);
        var r = m.Read(a);
        ctx.Wake(a, Machine.Pg);
        // The woken read retries and sleeps again: one ended sleep (wake), one raised.
        Assert.False(r.IsCompleted);
        ctx.Zeropage(a, Machine.Pg, 0);
        Assert.True(r.IsCompleted);
        ctx.Zeropage(a + Machine.Pg, Machine.Pg, 0);
        Assert.Equal(Errno.OK, ctx.Writeprotect(a + Machine.Pg, Machine.Pg, Uapi.WriteprotectModeWp));
        var w = m.Write(a + Machine.Pg, 2);
        Assert.False(w.IsCompleted);
        Assert.Equal(Errno.OK, ctx.Writeprotect(a + Machine.Pg, Machine.Pg, 0));
        Assert.True(w.IsCompleted);

        var got = m.K.Migration.Distributions().Where(d => d.Phase == FaultPhase.Total).Select(d => (d.Class, d.Outcome)).ToList();
        Assert.Equal([(UserfaultClass.Missing, UserfaultOutcome.Zeropage), (UserfaultClass.Missing, UserfaultOutcome.Wake), (UserfaultClass.Wp, UserfaultOutcome.Writeprotect)], got);
        // WAKE, the two ZEROPAGEs and the un-protect are round trips; protecting is not.
        Assert.Equal(4, m.K.Migration.RoundTrips);
        Assert.Equal(3, m.K.Migration.FaultsRaised);
    }
}
