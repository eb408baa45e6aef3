using Microsoft.Extensions.DependencyInjection;

namespace UffdGrpc.ContractTests;

/// <summary>A server with small workload limits, so each one can be reached.</summary>
public sealed class WorkloadLimitsFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Limits:WorkloadsPerMachine"] = "1",
        ["Limits:ThreadsPerWorkload"] = "2",
        ["Limits:WorkloadWritesRecorded"] = "4",
    };
}

/// <summary>
/// Guest workloads over the wire: seeded accesses that write the documented page layout,
/// fault and sleep like any access, stop and die with their machine without leaving a
/// sleeper behind; limits and bad input change nothing.
/// </summary>
public sealed class WorkloadTests(GrpcTestFixture fx, WorkloadLimitsFixture small) : IClassFixture<GrpcTestFixture>, IClassFixture<WorkloadLimitsFixture>
{
    private static WorkloadSpec Spec(ulong pages, WorkloadPattern pattern = WorkloadPattern.Uniform, ulong ops = 0, uint threads = 1, double writes = 1, ulong seed = 7) =>
        new() { Start = A, Length = pages * Page, Pattern = pattern, Seed = seed, Threads = threads, WriteRatio = writes, OpCount = ops };

    /// <summary>Every page the record says was written holds the pattern of its last write.</summary>
    private static async Task CheckPagesAsync(Sandbox s, IReadOnlyList<WorkloadWrite> writes)
    {
        foreach (var last in writes.GroupBy(w => w.Page).Select(g => g.MaxBy(w => w.Seq)!))
        {
            var r = await s.Client.ReadBytesAsync(s.Thread, last.Page, Page);
            Assert.Equal(WorkloadPages.Expected(last.Page, last.Generation), r.Values.ToByteArray());
            Assert.True(WorkloadPages.TryRead(r.Values.Span, out var a, out var g) && a == last.Page && g == last.Generation);
        }
    }

    [Fact]
    public async Task A_workload_runs_its_op_count_and_every_write_is_recorded_and_in_memory()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 64);
        var c = s.Client;
        var w = await c.StartWorkloadAsync(s.Mm, Spec(64, WorkloadPattern.Hotset9010, ops: 400, threads: 2, writes: 0.5));
        Assert.Equal(2, w.Threads.Count);
        Assert.Equal(WorkloadState.Running, w.State);
        var done = await c.WaitWorkloadAsync(w.WorkloadId);
        Assert.Equal(WorkloadState.Finished, done.State);
        Assert.Equal((400UL, 400UL), (done.Ops, done.Reads + done.Writes));
        Assert.InRange(done.Writes, 120UL, 280UL);
        Assert.Equal([200UL, 200UL], done.Threads.Select(t => t.Ops));
        // Their accesses done, the workload's threads have exited.
        Assert.All(done.Threads, t => Assert.Equal(ThreadState.Exited, t.State));

        var (writes, truncated) = await c.ReadAllWritesAsync(w.WorkloadId);
        Assert.False(truncated);
        Assert.Equal(done.Writes, (ulong)writes.Count);
        Assert.Equal(writes.Select(x => x.Seq).Order(), writes.Select(x => x.Seq));
        Assert.Equal(writes.Count, writes.Select(x => x.Seq).Distinct().Count());
        // Generations count up per page.
        Assert.All(writes.GroupBy(x => x.Page), g => Assert.Equal(Enumerable.Range(1, g.Count()).Select(i => (ulong)i), g.Select(x => x.Generation)));
        await CheckPagesAsync(s, writes);

        // A scan after the writes reports the sequence number of the last one.
        var scan = await c.PagemapScanAsync(new PagemapScanRequest { MmId = s.Mm, Start = A, End = A + (64 * Page), VecLen = 8, CategoryMask = 0, ReturnMask = 1 << 3 });
        Assert.Equal(writes[^1].Seq, scan.MachineSeq);
    }

    [Fact]
    public async Task The_same_seed_gives_the_same_writes_on_a_fresh_machine()
    {
        async Task<List<(ulong, ulong)>> RunAsync(ulong seed)
        {
            await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 32);
            var w = await s.Client.StartWorkloadAsync(s.Mm, Spec(32, WorkloadPattern.HotsetZipf, ops: 300, writes: 0.7, seed: seed));
            await s.Client.WaitWorkloadAsync(w.WorkloadId);
            return [.. (await s.Client.ReadAllWritesAsync(w.WorkloadId)).Writes.Select(x => (x.Page, x.Generation))];
        }

        var a = await RunAsync(11);
        Assert.Equal(a, await RunAsync(11));
        Assert.NotEqual(a, await RunAsync(12));
    }

    [Fact]
    public async Task Workload_threads_fault_and_sleep_until_a_handler_resolves_them()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 16, registerMode: 1);
        var c = s.Client;
        var w = await c.StartWorkloadAsync(s.Mm, Spec(16, WorkloadPattern.QemuMigrationTest, ops: 48));
        await EventuallyAsync(async () => (await c.GetWorkloadAsync(w.WorkloadId)).Threads[0].State == ThreadState.BlockedInUserfault, "the guest sleeps in a userfault");
        using var cts = new CancellationTokenSource();
        var handler = new FaultHandlerLoop(c, s.Uffd).RunAsync(cts.Token);
        var done = await c.WaitWorkloadAsync(w.WorkloadId);
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => handler);
        Assert.Equal(WorkloadState.Finished, done.State);
        Assert.Equal((48UL, 48UL, 16UL), (done.Ops, done.Writes, done.Userfaults));
        Assert.True(done.Threads[0].BlocktimeNs > 0 && done.BlocktimeNs > 0);
        // QEMU's guest: three passes over 16 pages, byte 0 incremented on each.
        var bytes = await c.ReadAsync(s.Thread, A, 16);
        Assert.All(bytes.Values.ToByteArray(), b => Assert.Equal(3, b));
        var (writes, _) = await c.ReadAllWritesAsync(w.WorkloadId);
        Assert.Equal([1UL, 2, 3], writes.Where(x => x.Page == A).Select(x => x.Generation));

        var m = await c.GetMigrationMetricsAsync(s.Machine);
        Assert.Equal((16UL, 16UL, 16UL), (m.Counters.FaultsRaised, m.Counters.FaultsEnded, m.Counters.PagesMoved));
        var total = Assert.Single(m.Histograms, h => h.Phase == FaultPhase.Total);
        Assert.Equal((FaultClass.Missing, FaultOutcome.Zeropage, 16UL), (total.FaultClass, total.Outcome, total.Count));
    }

    [Fact]
    public async Task Stopping_a_workload_asleep_in_userfaults_leaves_no_sleeper_and_no_message()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 8, registerMode: 1);
        var c = s.Client;
        var w = await c.StartWorkloadAsync(s.Mm, Spec(8, WorkloadPattern.Sequential, threads: 2));
        await EventuallyAsync(async () => (await c.GetWorkloadAsync(w.WorkloadId)).Threads.All(t => t.State == ThreadState.BlockedInUserfault), "both threads sleep");
        var stopped = await c.StopWorkloadAsync(w.WorkloadId);
        Assert.Equal(WorkloadState.Stopped, stopped.State);
        Assert.All(stopped.Threads, t => Assert.Equal(ThreadState.Exited, t.State));
        Assert.Equal(Errno.Eagain, (await c.ReadMessageAsync(s.Uffd)).Errno);
        Assert.Equal(stopped.State, (await c.StopWorkloadAsync(w.WorkloadId)).State);
        // The process lives on; its other thread still works.
        Assert.True((await c.ZeropageAsync(s.Uffd, A, Page)).Errno.IsOk());
        Assert.Equal(0, (await c.ReadAsync(s.Thread, A)).Values[0]);
        var m = await c.GetMigrationMetricsAsync(s.Machine, s.Mm);
        Assert.Contains(m.Histograms, h => h.Outcome == FaultOutcome.Exit);
    }

    [Fact]
    public async Task Destroying_the_machine_ends_a_sleeping_workload_and_its_waiter()
    {
        var c = fx.NewClient();
        var s = await Sandbox.CreateAsync(c, pages: 4, registerMode: 1);
        var w = await c.StartWorkloadAsync(s.Mm, Spec(4));
        await EventuallyAsync(async () => (await c.GetWorkloadAsync(w.WorkloadId)).Threads[0].State == ThreadState.BlockedInUserfault, "the thread sleeps");
        var registry = fx.Services.GetRequiredService<UffdGrpc.Server.Hosting.MachineRegistry>();
        Assert.True(registry.TryGet<UffdGrpc.Server.Hosting.WorkloadEntry>(w.WorkloadId, out var entry));
        var wait = c.WaitWorkloadAsync(w.WorkloadId);
        await c.DestroyMachineAsync(s.Machine);
        // The workload ended with its machine, its thread gone from the uffd's wait queue.
        await entry.Ended.Task.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.Equal(WorkloadState.Aborted, entry.State);
        Assert.Equal(UffdGrpc.Mm.ThreadState.Exited, entry.ThreadEntries[0].Thread.State);
        Assert.Equal(0, entry.Host.Kernel.Contexts.Sum(u => u.BlockedFaults));
        // A waiter that got in before the destroy is answered; one that did not finds no such workload.
        try
        {
            Assert.Equal(WorkloadState.Aborted, (await wait.WaitAsync(TimeSpan.FromSeconds(20))).State);
        }
        catch (RpcException ex) when (ex.StatusCode == StatusCode.NotFound)
        {
        }
        var gone = await Assert.ThrowsAsync<RpcException>(() => c.GetWorkloadAsync(w.WorkloadId));
        Assert.Equal(StatusCode.NotFound, gone.StatusCode);
    }

    [Fact]
    public async Task A_process_exit_aborts_its_workload()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 4, registerMode: 1);
        var c = s.Client;
        var w = await c.StartWorkloadAsync(s.Mm, Spec(4));
        await EventuallyAsync(async () => (await c.GetWorkloadAsync(w.WorkloadId)).Threads[0].State == ThreadState.BlockedInUserfault, "the thread sleeps");
        await c.Mm.DestroyMmAsync(new DestroyMmRequest { MmId = s.Mm });
        var ended = await c.WaitWorkloadAsync(w.WorkloadId);
        Assert.Equal(WorkloadState.Aborted, ended.State);
        Assert.Contains("exited", ended.EndReason, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Paced_writes_stay_near_the_dirty_rate()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 64);
        var spec = Spec(64, WorkloadPattern.Uniform, threads: 2);
        spec.DirtyRatePagesPerSec = 200;
        spec.DurationMs = 500;
        var done = await s.Client.WaitWorkloadAsync((await s.Client.StartWorkloadAsync(s.Mm, spec)).WorkloadId);
        Assert.Equal(WorkloadState.Finished, done.State);
        // 200 writes/s: at most the rate times the elapsed time (plus each thread's first), and not far below it.
        var seconds = done.ElapsedNs / 1e9;
        Assert.InRange(done.Writes, 20UL, (ulong)((200 * seconds) + 4));
    }

    [Fact]
    public async Task Workload_threads_refuse_other_operations()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 4, registerMode: 1);
        var c = s.Client;
        var w = await c.StartWorkloadAsync(s.Mm, Spec(4));
        var ex = await Assert.ThrowsAsync<RpcException>(() => c.ReadAsync(w.Threads[0].ThreadId, A));
        Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
        Assert.Equal("WORKLOAD_THREAD", ErrorInfoOf(ex)?.Reason);
        await c.StopWorkloadAsync(w.WorkloadId);
    }

    [Fact]
    public async Task Bad_input_is_refused_and_changes_nothing()
    {
        await using var s = await Sandbox.CreateAsync(fx.NewClient(), pages: 4);
        var c = s.Client;
        async Task Refused(StatusCode code, Func<Task> call) => Assert.Equal(code, (await Assert.ThrowsAsync<RpcException>(call)).StatusCode);

        await Refused(StatusCode.InvalidArgument, () => c.Workloads.StartWorkloadAsync(new StartWorkloadRequest { MmId = s.Mm }).ResponseAsync);
        await Refused(StatusCode.InvalidArgument, () => c.StartWorkloadAsync(s.Mm, Spec(4, WorkloadPattern.Unspecified)));
        await Refused(StatusCode.InvalidArgument, () => c.StartWorkloadAsync(s.Mm, Spec(0)));
        await Refused(StatusCode.InvalidArgument, () => c.StartWorkloadAsync(s.Mm, Spec(4, writes: 2)));
        await Refused(StatusCode.InvalidArgument, () => c.StartWorkloadAsync(s.Mm, Spec(4, WorkloadPattern.Sequential, threads: 5)));
        await Refused(StatusCode.NotFound, () => c.StartWorkloadAsync(12345, Spec(4)));
        await Refused(StatusCode.InvalidArgument, () => c.StartWorkloadAsync(0, Spec(4)));
        await Refused(StatusCode.NotFound, () => c.GetWorkloadAsync(12345));
        await Refused(StatusCode.NotFound, () => c.StopWorkloadAsync(12345));
        await Refused(StatusCode.NotFound, () => c.WaitWorkloadAsync(12345));
        await Refused(StatusCode.NotFound, () => c.GetMigrationMetricsAsync(12345));
        await Refused(StatusCode.NotFound, () => c.Workloads.ListWorkloadsAsync(new ListWorkloadsRequest { MachineId = 12345 }).ResponseAsync);
        var other = await c.CreateMachineAsync();
        await Refused(StatusCode.InvalidArgument, () => c.GetMigrationMetricsAsync(other.MachineId, s.Mm));
        await c.DestroyMachineAsync(other.MachineId);

        var w = await c.StartWorkloadAsync(s.Mm, Spec(4, ops: 1));
        await c.WaitWorkloadAsync(w.WorkloadId);
        await Refused(StatusCode.InvalidArgument, () => c.Workloads.ReadWritesAsync(new ReadWritesRequest { WorkloadId = w.WorkloadId, MaxEntries = 65537 }).ResponseAsync);

        // Only the sandbox's thread and the finished workload's exist.
        Assert.Equal(2, (await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm })).Threads.Count);
        Assert.Single((await c.Workloads.ListWorkloadsAsync(new ListWorkloadsRequest { MachineId = s.Machine })).Workloads);
    }

    [Fact]
    public async Task A_journaled_machine_refuses_workloads()
    {
        var c = fx.NewClient();
        var m = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { Journal = true } })).Machine.MachineId;
        try
        {
            var mm = await c.CreateMmAsync(m);
            Assert.True((await c.MmapAsync(mm, A, Page, 3)).IsOk());
            var steps = (await c.GetMachineAsync(m)).JournalSteps;
            var ex = await Assert.ThrowsAsync<RpcException>(() => c.StartWorkloadAsync(mm, Spec(1)));
            Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
            Assert.Equal("JOURNALED_MACHINE", ErrorInfoOf(ex)?.Reason);
            Assert.Equal(steps, (await c.GetMachineAsync(m)).JournalSteps);
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
    }

    [Fact]
    public async Task Workload_limits_are_refused_with_their_name_and_the_record_truncates()
    {
        await using var s = await Sandbox.CreateAsync(small.NewClient(), pages: 4, registerMode: 1);
        var c = s.Client;
        async Task<string> Quota(Func<Task> call)
        {
            var ex = await Assert.ThrowsAsync<RpcException>(call);
            Assert.Equal(StatusCode.ResourceExhausted, ex.StatusCode);
            return Assert.Single(ex.GetRpcStatus()!.GetDetail<Google.Rpc.QuotaFailure>().Violations).Description;
        }

        Assert.StartsWith("ThreadsPerWorkload = 2", await Quota(() => c.StartWorkloadAsync(s.Mm, Spec(4, threads: 3))), StringComparison.Ordinal);
        var w = await c.StartWorkloadAsync(s.Mm, Spec(4, threads: 2));
        Assert.StartsWith("WorkloadsPerMachine = 1", await Quota(() => c.StartWorkloadAsync(s.Mm, Spec(4))), StringComparison.Ordinal);
        Assert.Equal(3, (await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm })).Threads.Count);
        await c.StopWorkloadAsync(w.WorkloadId);
        Assert.True((await c.UnregisterAsync(s.Uffd, A, 4 * Page)).IsOk());

        var full = await c.WaitWorkloadAsync((await c.StartWorkloadAsync(s.Mm, Spec(4, ops: 10))).WorkloadId);
        Assert.Equal((10UL, 4UL, true), (full.Writes, full.WritesRecorded, full.WritesTruncated));
        var (writes, truncated) = await c.ReadAllWritesAsync(full.WorkloadId);
        Assert.Equal((4, true), (writes.Count, truncated));
    }
}

/// <summary>A server of its own, to be shut down.</summary>
public sealed class WorkloadShutdownFixture : GrpcTestFixture;

/// <summary>A stopping server ends every workload at once: running, paced and asleep in a userfault.</summary>
public sealed class WorkloadShutdownTests(WorkloadShutdownFixture fx) : IClassFixture<WorkloadShutdownFixture>
{
    [Fact]
    public async Task Shutdown_ends_running_and_sleeping_workloads()
    {
        var c = fx.NewClient();
        var s = await Sandbox.CreateAsync(c, pages: 8, registerMode: 1);
        var mm2 = await c.CreateMmAsync(s.Machine);
        Assert.True((await c.MmapAsync(mm2, A, 8 * Page, 3)).IsOk());
        var spec = new WorkloadSpec { Start = A, Length = 8 * Page, Pattern = WorkloadPattern.Uniform, WriteRatio = 0.5 };
        var sleeping = await c.StartWorkloadAsync(s.Mm, spec);
        var running = await c.StartWorkloadAsync(mm2, spec);
        var paced = await c.StartWorkloadAsync(mm2, new WorkloadSpec(spec) { DirtyRatePagesPerSec = 1 });
        await EventuallyAsync(async () => (await c.GetWorkloadAsync(sleeping.WorkloadId)).Threads[0].State == ThreadState.BlockedInUserfault, "the guest sleeps");
        await EventuallyAsync(async () => (await c.GetWorkloadAsync(running.WorkloadId)).Ops > 100, "the other runs");

        var registry = fx.Services.GetRequiredService<UffdGrpc.Server.Hosting.MachineRegistry>();
        var entries = new[] { sleeping, running, paced }.Select(w =>
        {
            Assert.True(registry.TryGet<UffdGrpc.Server.Hosting.WorkloadEntry>(w.WorkloadId, out var e));
            return e;
        }).ToList();
        registry.Shutdown();
        foreach (var e in entries)
        {
            await e.Ended.Task.WaitAsync(TimeSpan.FromSeconds(20));
            Assert.Equal(WorkloadState.Aborted, e.State);
            Assert.Contains("shutting down", e.EndReason, StringComparison.Ordinal);
        }
        var ex = await Assert.ThrowsAsync<RpcException>(() => c.GetWorkloadAsync(running.WorkloadId));
        Assert.Equal(StatusCode.Unavailable, ex.StatusCode);
    }
}
