namespace UffdGrpc.ContractTests;

/// <summary>A server with the kernel backend on but its helper missing (as on a host that cannot build or run it).</summary>
public sealed class KernelBackendNoHelperFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["KernelBackend:Enabled"] = "true",
        ["KernelBackend:HelperPath"] = "/nonexistent/uffd-helper",
    };
}

/// <summary>With the kernel backend off (the default), or on where it cannot run, CreateMm with MM_BACKEND_KERNEL is refused and says why.</summary>
public sealed class KernelBackendOffTests(KernelBackendOffFixture fx, KernelBackendNoHelperFixture noHelper) : IClassFixture<KernelBackendOffFixture>, IClassFixture<KernelBackendNoHelperFixture>
{
    [Fact]
    public async Task A_host_that_cannot_run_the_backend_refuses_it_with_the_reason()
    {
        await noHelper.InMachineAsync(async (c, m) =>
        {
            var ex = await Assert.ThrowsAsync<RpcException>(() => c.CreateMmAsync(m, MmBackend.Kernel));
            Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
            Assert.Contains("cannot run the kernel backend", ex.Status.Detail, StringComparison.Ordinal);
            Assert.Empty((await c.GetMachineAsync(m)).MmIds);
        });
    }

    [Fact]
    public async Task A_kernel_backed_address_space_is_refused_unless_the_server_enables_the_backend()
    {
        await fx.InMachineAsync(async (c, m) =>
        {
            var ex = await Assert.ThrowsAsync<RpcException>(() => c.CreateMmAsync(m, MmBackend.Kernel));
            Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
            Assert.Contains("KernelBackend:Enabled=true", ex.Status.Detail, StringComparison.Ordinal);
            Assert.Empty((await c.GetMachineAsync(m)).MmIds);
            var bad = await Assert.ThrowsAsync<RpcException>(() => c.CreateMmAsync(m, (MmBackend)7));
            Assert.Equal(StatusCode.InvalidArgument, bad.StatusCode);
            // The model's backend, named or not, is what it always was.
            var mm = await c.CreateMmAsync(m, MmBackend.Model);
            Assert.Equal(MmBackend.Model, (await c.Mm.GetMmAsync(new GetMmRequest { MmId = mm })).Mm.Backend);
        });
    }
}

/// <summary>
/// Kernel-backed address spaces: calls they do not serve, their limits, and their helper's
/// life (killed and reaped with the address space or the machine; a crash breaks the address
/// space and fails its waiters). Skipped, with the reason, where the host cannot run the backend.
/// </summary>
[Collection("kernel-backend")]
public sealed class KernelBackedMmLifecycleTests(KernelBackendFixture fx, Xunit.Abstractions.ITestOutputHelper output) : IClassFixture<KernelBackendFixture>
{
    private const ulong X = 0x1000_0000_0000;
    private static readonly TimeSpan s_wait = TimeSpan.FromSeconds(20);

    private void SkipUnlessHostCanRun() => KernelBackendFixture.SkipUnlessHostCanRun(output);

    /// <summary>The pids of the uffd-helper children of <paramref name="parent"/> (this process by default).</summary>
    private static HashSet<int> HelperPids(int parent = 0)
    {
        parent = parent == 0 ? Environment.ProcessId : parent;
        var pids = new HashSet<int>();
        foreach (var dir in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out var pid))
                continue;
            try
            {
                var stat = File.ReadAllText(Path.Combine(dir, "stat"));
                var close = stat.LastIndexOf(')');
                var ppid = int.Parse(stat[(close + 2)..].Split(' ')[1], System.Globalization.CultureInfo.InvariantCulture);
                if (stat[(stat.IndexOf('(') + 1)..close] == "uffd-helper" && ppid == parent)
                    pids.Add(pid);
            }
            catch (IOException)
            {
                // It ended while we looked.
            }
        }
        return pids;
    }

    /// <summary>A kernel-backed address space and the pid of its helper.</summary>
    private static async Task<(long Mm, int Pid)> CreateKernelMmAsync(UffdClient c, long machine)
    {
        var before = HelperPids();
        var mm = await c.CreateMmAsync(machine, MmBackend.Kernel);
        return (mm, Assert.Single(HelperPids().Except(before)));
    }

    /// <summary>A thread of <paramref name="mm"/> asleep in a real userfault (a MISSING fault nobody resolves), and its pending Access.</summary>
    private static async Task<Task<AccessResponse>> BlockedAccessAsync(UffdClient c, long mm)
    {
        Assert.True((await c.MmapAsync(mm, X, Page, 3)).IsOk());
        var t = (await c.CreateThreadAsync(mm)).ThreadId;
        var (_, u) = await c.CreateUffdAsync(mm);
        Assert.True((await c.ApiAsync(u)).Errno.IsOk());
        Assert.True((await c.RegisterAsync(u, X, Page, 1)).Errno.IsOk());
        var access = c.Threads.AccessAsync(new AccessRequest { ThreadId = t, Access = UffdClient.Touch(X, write: false) }).ResponseAsync;
        using var cts = new CancellationTokenSource(s_wait);
        while ((await c.GetThreadAsync(t)).State != ThreadState.BlockedInUserfault)
            await Task.Delay(10, cts.Token);
        return access;
    }

    private static void AssertRefused(RpcException ex, string method)
    {
        Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
        Assert.Contains(method, ex.Status.Detail, StringComparison.Ordinal);
        Assert.Contains("kernel-backed", ex.Status.Detail, StringComparison.Ordinal);
    }

    [SkippableFact]
    public async Task Calls_the_kernel_backend_does_not_serve_are_refused_by_name_and_change_nothing()
    {
        SkipUnlessHostCanRun();
        await fx.InMachineAsync(async (c, m) =>
        {
            var mm = await c.CreateMmAsync(m, MmBackend.Kernel);
            var t = (await c.CreateThreadAsync(mm)).ThreadId;
            AssertRefused(await Assert.ThrowsAsync<RpcException>(() => c.ForkAsync(mm)), "MmService/Fork");
            AssertRefused(await Assert.ThrowsAsync<RpcException>(() => c.ListVmasAsync(mm)), "MmService/ListVmas");
            AssertRefused(await Assert.ThrowsAsync<RpcException>(() => c.ExportMmAsync(mm)), "MmService/ExportMm");
            AssertRefused(await Assert.ThrowsAsync<RpcException>(() => c.StartOpAsync(t, new ThreadOp { Madvise = new MadviseOp { Start = X, Len = Page, Advice = 4 } })), "StartOp of Madvise");
            var file = await c.CreateFileAsync(m, "f", shmem: true, Page);
            AssertRefused(await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(mm, X, Page, 3, shared: true, fileId: file.FileId)), "Mmap of a file");
            var own = await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(mm, 0x7e00_0000_0000, Page, 3));
            Assert.Equal(StatusCode.InvalidArgument, own.StatusCode);
            // Nothing was mapped by any of them.
            Assert.False((await c.PagemapAsync(mm, X, 1))[0].Present);
            Assert.True((await c.MmapAsync(mm, X, Page, 3)).IsOk());
            var model = await c.CreateMmAsync(m);
            var listed = await c.Mm.ListMmsAsync(new ListMmsRequest { MachineId = m });
            Assert.Equal(new[] { mm, model }.Order(), listed.Mms.Select(i => i.MmId));
            Assert.Equal(MmBackend.Kernel, listed.Mms.Single(i => i.MmId == mm).Backend);
            Assert.Equal(MmBackend.Model, listed.Mms.Single(i => i.MmId == model).Backend);
            var threads = await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = mm });
            Assert.Equal(t, Assert.Single(threads.Threads).ThreadId);
            Assert.Equal(ThreadState.Idle, threads.Threads[0].State);
        });
    }

    [SkippableFact]
    public async Task Mapped_bytes_per_address_space_and_helpers_per_server_are_limited()
    {
        SkipUnlessHostCanRun();
        await fx.InMachineAsync(async (c, m) =>
        {
            var mm = await c.CreateMmAsync(m, MmBackend.Kernel);
            Assert.True((await c.MmapAsync(mm, X, 1 << 20, 3)).IsOk());
            var ex = await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(mm, X + (1 << 20), Page, 3));
            Assert.Equal(StatusCode.ResourceExhausted, ex.StatusCode);
            Assert.Contains("KernelMmBytes", ex.Status.Detail, StringComparison.Ordinal);
            Assert.False((await c.PagemapAsync(mm, X + (1 << 20), 1))[0].Present);
            Assert.True((await c.MunmapAsync(mm, X, Page)).IsOk());
            Assert.True((await c.MmapAsync(mm, X + (1 << 20), Page, 3)).IsOk());

            await c.CreateMmAsync(m, MmBackend.Kernel);
            var third = await c.CreateMmAsync(m, MmBackend.Kernel);
            var limit = await Assert.ThrowsAsync<RpcException>(() => c.CreateMmAsync(m, MmBackend.Kernel));
            Assert.Equal(StatusCode.ResourceExhausted, limit.StatusCode);
            Assert.Contains("KernelHelpersPerServer", limit.Status.Detail, StringComparison.Ordinal);
            await c.DestroyMmAsync(third);
            await c.CreateMmAsync(m, MmBackend.Kernel);
        });
    }

    [SkippableFact]
    public async Task DestroyMm_kills_and_reaps_the_helper_and_ends_an_access_asleep_in_a_userfault()
    {
        SkipUnlessHostCanRun();
        var c = fx.NewClient();
        var m = (await c.CreateMachineAsync()).MachineId;
        try
        {
            var (mm, pid) = await CreateKernelMmAsync(c, m);
            var access = await BlockedAccessAsync(c, mm);
            Assert.False(access.IsCompleted);
            await c.DestroyMmAsync(mm);
            var r = (await access.WaitAsync(s_wait)).Result;
            Assert.True(r.Aborted);
            Assert.False(Directory.Exists($"/proc/{pid}"), $"helper {pid} is still there after DestroyMm");
            Assert.True((await c.Mm.GetMmAsync(new GetMmRequest { MmId = mm })).Mm.Exited);
            var after = await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(mm, X, Page, 3));
            Assert.Equal(StatusCode.FailedPrecondition, after.StatusCode);

            // The machine's end kills the helpers it still has; their sleeping accesses end UNAVAILABLE.
            var (mm2, pid2) = await CreateKernelMmAsync(c, m);
            var access2 = await BlockedAccessAsync(c, mm2);
            await c.DestroyMachineAsync(m);
            Assert.False(Directory.Exists($"/proc/{pid2}"), $"helper {pid2} is still there after DestroyMachine");
            var gone = await Assert.ThrowsAsync<RpcException>(() => access2.WaitAsync(s_wait));
            Assert.Equal(StatusCode.Unavailable, gone.StatusCode);
        }
        finally
        {
            await DestroyIfThere(c, m);
        }
        Assert.Empty(fx.Errors);
    }

    [SkippableFact]
    public async Task A_helper_that_dies_breaks_its_address_space_and_fails_its_waiters()
    {
        SkipUnlessHostCanRun();
        await fx.InMachineAsync(async (c, m) =>
        {
            var (mm, pid) = await CreateKernelMmAsync(c, m);
            var access = await BlockedAccessAsync(c, mm);
            System.Diagnostics.Process.GetProcessById(pid).Kill();
            var ex = await Assert.ThrowsAsync<RpcException>(() => access.WaitAsync(s_wait));
            Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
            Assert.Contains("broken", ex.Status.Detail, StringComparison.Ordinal);
            Assert.True((await c.Mm.GetMmAsync(new GetMmRequest { MmId = mm })).Mm.Exited);
            var later = await Assert.ThrowsAsync<RpcException>(() => c.CreateThreadAsync(mm));
            Assert.Contains("broken", later.Status.Detail, StringComparison.Ordinal);
            using var cts = new CancellationTokenSource(s_wait);
            while (Directory.Exists($"/proc/{pid}"))
                await Task.Delay(10, cts.Token);
        });
    }

    [SkippableFact]
    public async Task A_stopping_server_kills_its_helpers_and_ends_their_sleeping_accesses_with_UNAVAILABLE()
    {
        SkipUnlessHostCanRun();
        await using var server = await ServerProcess.StartAsync(new Dictionary<string, string> { ["KernelBackend__Enabled"] = "true" });
        using var c = new UffdClient(server.Address);
        var m = (await c.CreateMachineAsync()).MachineId;
        var mm = await c.CreateMmAsync(m, MmBackend.Kernel);
        var pid = Assert.Single(HelperPids(server.Pid));
        var access = await BlockedAccessAsync(c, mm);
        var took = await server.TerminateAsync(TimeSpan.FromSeconds(10));
        Assert.True(took < TimeSpan.FromSeconds(5), $"the server took {took.TotalSeconds:F1} s to exit");
        var ex = await Assert.ThrowsAsync<RpcException>(() => access);
        Assert.Equal(StatusCode.Unavailable, ex.StatusCode);
        Assert.False(Directory.Exists($"/proc/{pid}"), $"helper {pid} outlived its server");
    }

    private static async Task DestroyIfThere(UffdClient c, long m)
    {
        try
        {
            await c.DestroyMachineAsync(m);
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.NotFound)
        {
            // Already destroyed by the test.
        }
    }
}
