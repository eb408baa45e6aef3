using System.Diagnostics;
using Xunit.Abstractions;

namespace UffdGrpc.ContractTests;

/// <summary>
/// GetMigrationMetrics over the wire: the phases split where the handler's time goes, the
/// outcome of a wake after a failed fill, blocktime with QEMU's overlap rule.
/// </summary>
public sealed class MigrationMetricsContractTests(GrpcTestFixture fx, ITestOutputHelper output) : IClassFixture<GrpcTestFixture>
{
    /// <summary>A page fault on <paramref name="addr"/>, read by <paramref name="session"/>, resolved after the handler's <paramref name="work"/>.</summary>
    private static async Task FaultAndResolveAsync(Sandbox s, ServeSession session, ulong addr, TimeSpan work)
    {
        var op = await s.Client.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(addr, write: false) });
        var msgs = await session.Messages.ReadAsync();
        var received = Stopwatch.GetTimestamp();
        Assert.Equal(addr, Assert.Single(msgs).Pagefault.Address);
        // The handler's own work, spun so that the timer's resolution does not matter.
        while (Stopwatch.GetElapsedTime(received) < work)
            Thread.SpinWait(50);
        Assert.True(Assert.Single(await session.ResolveAsync([ServeSession.Zeropage(addr)])).Errno.IsOk());
        Assert.Equal(Errno.Unspecified, (await s.Client.WaitOpAsync(op.OpId)).Errno);
    }

    [Fact]
    public async Task A_handler_that_takes_5_ms_before_resolving_moves_only_the_handling_phase()
    {
        const int attempts = 5;
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: attempts + 1, registerMode: 1);
        var c = s.Client;
        await using var session = await c.ServeAsync(s.Uffd);
        // A resolution answered means the stream's reader is already asleep on the uffd.
        await session.ResolveAsync([ServeSession.Wake(A)]);
        // A first fault warms the path (JIT); each attempt's fault is the difference of two reads.
        await FaultAndResolveAsync(s, session, A, TimeSpan.Zero);
        var before = await c.GetMigrationMetricsAsync(s.Machine, s.Mm);
        var seen = new List<string>();
        for (var i = 1; i <= attempts; i++)
        {
            // 4.5 ms past the message's arrival at the handler: with the wire both ways, about 5 ms after the server's read.
            await FaultAndResolveAsync(s, session, A + ((ulong)i * Page), TimeSpan.FromMicroseconds(4500));
            var m = await c.GetMigrationMetricsAsync(s.Machine, s.Mm);
            Assert.Equal(33, m.BucketUpperBoundsUs.Count);
            Assert.Equal(8192UL, m.BucketUpperBoundsUs[12]);
            Assert.All(m.Histograms, h => Assert.Equal((FaultClass.Missing, FaultOutcome.Zeropage), (h.FaultClass, h.Outcome)));
            int Bucket(FaultPhase p)
            {
                var now = Assert.Single(m.Histograms, h => h.Phase == p).Counts;
                var then = Assert.Single(before.Histograms, h => h.Phase == p).Counts;
                var diff = now.Zip(then, (a, b) => a - b).ToList();
                Assert.Equal(1UL, diff.Aggregate(0UL, (x, y) => x + y));
                return diff.IndexOf(1UL);
            }
            var (queued, handling, waking) = (Bucket(FaultPhase.Queued), Bucket(FaultPhase.Handling), Bucket(FaultPhase.Waking));
            before = m;
            // Whatever the load, the handler's 4.5 ms lie between the read and the call: handling is at least 4096 µs.
            Assert.True(handling >= 12, $"handling in bucket {handling}");
            seen.Add($"queued {queued}, handling {handling}, waking {waking}");
            // The handler's time moves the handling phase only: queued and waking stay below 4096 µs
            // (an attempt a busy machine delayed by milliseconds elsewhere is repeated). On a quiet
            // machine handling lands in the 4096–8192 µs bucket itself (bucket 12); the wire's share
            // of it grows with the load, so the exact bucket is asserted in model time
            // (UnitTests.MigrationMetricsTests), here it is reported.
            if (queued < 12 && waking < 12)
            {
                Assert.Equal((ulong)(1 + i), m.Counters.PagesMoved);
                // The ping WAKE and the ZEROPAGEs; zero pages are mapped, not resident.
                Assert.Equal((ulong)(2 + i), m.Counters.RoundTrips);
                Assert.Equal(0UL, m.Counters.ResidentPages);
                output.WriteLine($"attempt {i}: {seen[^1]} (bucket 12 = 4096–8192 µs)");
                return;
            }
        }
        Assert.Fail("no attempt kept queued and waking under 4096 µs: " + string.Join("; ", seen));
    }

    [Fact]
    public async Task One_thread_blocked_10_ms_while_another_runs_leaves_the_process_unblocked()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 1, registerMode: 1);
        var c = s.Client;
        var other = await s.NewThreadAsync();
        var op = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A, write: false) });
        // The fault was raised before StartOp answered and is resolved after this interval,
        // so the thread slept at least as long (Task.Delay's timer may fire up to a tick early:
        // the interval is measured, not assumed).
        var interval = System.Diagnostics.Stopwatch.StartNew();
        await Task.Delay(10);
        var atLeast = (long)interval.Elapsed.TotalNanoseconds;
        Assert.True((await c.ZeropageAsync(s.Uffd, A, Page)).Errno.IsOk());
        await c.WaitOpAsync(op.OpId);

        var m = await c.GetMigrationMetricsAsync(s.Machine, s.Mm);
        var p = Assert.Single(m.Processes);
        Assert.Equal((s.Mm, 0L), (p.MmId, p.BlocktimeNs));
        var slept = Assert.Single(p.Threads, t => t.ThreadId == s.Thread).BlocktimeNs;
        Assert.True(slept >= atLeast, $"the sleeping thread's blocktime is {slept} ns, less than the {atLeast} ns between StartOp's answer and the UFFDIO_ZEROPAGE call");
        Assert.Equal(0L, Assert.Single(p.Threads, t => t.ThreadId == other.ThreadId).BlocktimeNs);
        // The machine's view holds the same process.
        Assert.Equal(p, Assert.Single((await c.GetMigrationMetricsAsync(s.Machine)).Processes));
    }

    [Fact]
    public async Task A_wake_after_a_copy_that_met_an_existing_page_is_reported_as_eexist()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 1, registerMode: 1);
        var c = s.Client;
        var op = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A, write: false) });
        Assert.True((await c.ZeropageAsync(s.Uffd, A, Page, mode: 1)).Errno.IsOk());
        Assert.Equal(Errno.Eexist, (await c.CopyAsync(s.Uffd, A, new byte[Page])).Errno);
        Assert.Equal(ThreadState.BlockedInUserfault, (await c.GetThreadAsync(s.Thread)).State);
        Assert.True((await c.WakeAsync(s.Uffd, A, Page)).IsOk());
        await c.WaitOpAsync(op.OpId);

        var m = await c.GetMigrationMetricsAsync(s.Machine);
        Assert.All(m.Histograms, h => Assert.Equal(FaultOutcome.Eexist, h.Outcome));
        Assert.Equal((1UL, 3UL, 1UL, 0UL), (m.Counters.PagesMoved, m.Counters.RoundTrips, m.Counters.FillsEexist, m.Counters.ResidentPages));
    }
}
