namespace UffdGrpc.ContractTests;

/// <summary>A server whose machines together may hold 16 MiB.</summary>
public sealed class SmallServerFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Limits:ServerMemoryBytes"] = (16 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture),
    };
}

/// <summary>
/// Memory a machine cannot exceed, and a server budget no request can exceed: past them the
/// machine behaves as Linux does (reclaim, then the OOM killer; fills get ENOMEM), in-band.
/// </summary>
public sealed class MemoryTests(SmallServerFixture fx) : IClassFixture<SmallServerFixture>
{
    private const ulong MiB = 1 << 20;

    private async Task<(long Machine, long Mm, long Thread)> MachineAsync(UffdClient c, ulong memory)
    {
        var m = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { MemoryBytes = memory } })).Machine;
        Assert.Equal(memory, m.MemoryBytes);
        var mm = await c.CreateMmAsync(m.MachineId);
        return (m.MachineId, mm, (await c.CreateThreadAsync(mm)).ThreadId);
    }

    [Fact]
    public async Task A_huge_zeropage_on_a_small_machine_ends_at_once_with_the_kernels_outcome()
    {
        var c = fx.NewClient();
        var (m, mm, _) = await MachineAsync(c, 2 * MiB);
        try
        {
            const ulong huge = 1UL << 46;
            Assert.True((await c.MmapAsync(mm, 0x1000_0000_0000, huge, 3)).IsOk());
            var (e, u) = await c.CreateUffdAsync(mm);
            Assert.True(e.IsOk());
            Assert.True((await c.ApiAsync(u)).Errno.IsOk());
            Assert.True((await c.RegisterAsync(u, 0x1000_0000_0000, huge, 1)).Errno.IsOk());
            var sw = System.Diagnostics.Stopwatch.StartNew();
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            var r = await c.ZeropageAsync(u, 0x1000_0000_0000, huge, ct: cts.Token);
            // The page tables fill the machine: the OOM killer ends the process being filled.
            Assert.NotEqual(Errno.Unspecified, r.Errno);
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"took {sw.Elapsed}");
            var info = await c.GetMachineAsync(m);
            Assert.True(info.OomKills >= 1);
            Assert.True(info.UsedPages <= (long)(2 * MiB / Page));
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
    }

    [Fact]
    public async Task The_server_budget_makes_the_machine_that_asks_for_too_much_kill_its_own_process()
    {
        var c = fx.NewClient();
        var (a, amm, at) = await MachineAsync(c, 12 * MiB);
        var (b, bmm, bt) = await MachineAsync(c, 12 * MiB);
        try
        {
            Assert.True((await c.MmapAsync(amm, A, 10 * MiB, 3)).IsOk());
            Assert.True((await c.MmapAsync(bmm, A, 10 * MiB, 3)).IsOk());
            var fillA = await c.WriteAsync(at, A, 0x11, count: (uint)(10 * MiB / Page));
            Assert.True(fillA.Errno.IsOk());
            // 10 MiB of A's plus 10 MiB of B's is past the server's 16 MiB: B's writer is the victim.
            var fillB = await c.Threads.AccessAsync(new AccessRequest { ThreadId = bt, Access = UffdClient.Touch(A, true, 0x22, (uint)(10 * MiB / Page)) });
            Assert.True(fillB.Result.Aborted);
            Assert.Equal(1, (await c.GetMachineAsync(b)).OomKills);
            Assert.Equal(0, (await c.GetMachineAsync(a)).OomKills);
            // A's contents are intact.
            var back = await c.ReadAsync(at, A + (5 * MiB), 1);
            Assert.Equal(0x11, back.Values[0]);
        }
        finally
        {
            await c.DestroyMachineAsync(a);
            await c.DestroyMachineAsync(b);
        }
    }

    [Fact]
    public async Task A_machine_larger_than_the_limit_is_refused()
    {
        var c = fx.NewClient();
        var ex = await Assert.ThrowsAsync<RpcException>(() => c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { MemoryBytes = 1UL << 40 } }).ResponseAsync);
        Assert.Equal(StatusCode.InvalidArgument, ex.StatusCode);
    }
}
