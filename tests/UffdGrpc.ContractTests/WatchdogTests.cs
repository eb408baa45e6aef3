namespace UffdGrpc.ContractTests;

/// <summary>A server whose hung-userfault watchdog kills after half a second.</summary>
public sealed class WatchdogFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Watchdog:UserfaultSeconds"] = "0.5",
    };
}

/// <summary>
/// The hung-userfault watchdog (Watchdog:UserfaultSeconds, off by default): a thread asleep
/// in a userfault that long gets SIGKILL, as a fatal signal ends such a sleep in the kernel.
/// </summary>
public sealed class WatchdogTests(WatchdogFixture fx) : IClassFixture<WatchdogFixture>
{
    [Fact]
    public async Task A_thread_asleep_past_the_watchdog_is_killed_and_later_fills_get_ESRCH()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1);
        var started = System.Diagnostics.Stopwatch.StartNew();

        // Nobody serves the uffd: the access sleeps until the watchdog's SIGKILL ends it.
        var r = (await c.Threads.AccessAsync(new AccessRequest { ThreadId = s.Thread, Access = new AccessOp { Addr = A, Touch = new TouchPattern { Pages = 1 } } }, deadline: DateTime.UtcNow.AddSeconds(30))).Result;

        Assert.True(r.Aborted);
        Assert.True(started.Elapsed >= TimeSpan.FromSeconds(0.4), $"{started.Elapsed}");
        Assert.True((await c.Mm.GetMmAsync(new GetMmRequest { MmId = s.Mm })).Mm.Exited);
        var copy = await c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = s.Uffd, Dst = A, Len = Page, Fill = 1 });
        Assert.Equal(Errno.Esrch, copy.Errno);
        Assert.Empty(fx.Errors);
    }

    [Fact]
    public async Task A_sleep_resolved_in_time_is_left_alone()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        var access = c.Threads.AccessAsync(new AccessRequest { ThreadId = s.Thread, Access = new AccessOp { Addr = A, Touch = new TouchPattern { Pages = 1 } } });
        await EventuallyAsync(async () => (await c.Uffd.PollAsync(new PollRequest { UffdId = s.Uffd })).Unread == 1, "the fault is queued");
        await c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = s.Uffd, Dst = A, Len = Page, Fill = 7 });
        var r = (await access).Result;
        Assert.False(r.Aborted);
        Assert.Equal(7, r.Values[0]);
        // Past the timeout the process is alive.
        await Task.Delay(TimeSpan.FromSeconds(1));
        Assert.False((await c.Mm.GetMmAsync(new GetMmRequest { MmId = s.Mm })).Mm.Exited);
    }
}
