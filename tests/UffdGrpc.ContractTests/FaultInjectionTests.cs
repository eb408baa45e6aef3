namespace UffdGrpc.ContractTests;

/// <summary>
/// FaultInjectionService: rules are validated, listed, fired and removed; the log is read and
/// streamed; and the sites the scenario language cannot script (an event read before a
/// racing fault, the handler's side of the wire) do what the kernel and the wire would.
/// </summary>
public class FaultInjectionTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    private static ThreadOp Write(ulong addr, byte value) =>
        new() { Access = new AccessOp { Addr = addr, Write = true, Touch = new TouchPattern { Pages = 1, Value = value } } };

    private static async Task<long> AddAsync(UffdClient c, long machine, InjectRule rule) =>
        (await c.Injection.AddRuleAsync(new AddRuleRequest { MachineId = machine, Rule = rule })).RuleId;

    [Fact]
    public async Task Inconsistent_rules_are_INVALID_ARGUMENT_unknown_ids_NOT_FOUND_and_nothing_is_added()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        var bad = new[]
        {
            new InjectRule(),
            new InjectRule { Site = InjectSite.FillPartial },
            new InjectRule { Site = InjectSite.MmapChanging, Probability = 1.5 },
            new InjectRule { Site = InjectSite.MmapChanging, Every = -1 },
            new InjectRule { Site = InjectSite.RpcAbort, Status = 0 },
            new InjectRule { Site = InjectSite.Migrate, Start = A + Page, End = A },
        };
        foreach (var r in bad)
        {
            var ex = await Assert.ThrowsAsync<RpcException>(() => AddAsync(c, s.Machine, r));
            Assert.Equal(StatusCode.InvalidArgument, ex.StatusCode);
        }
        var unknownMm = await Assert.ThrowsAsync<RpcException>(() => AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.MmapChanging, MmId = 999_999_999 }));
        Assert.Equal(StatusCode.NotFound, unknownMm.StatusCode);
        var remove = await Assert.ThrowsAsync<RpcException>(async () => await c.Injection.RemoveRuleAsync(new RemoveRuleRequest { MachineId = s.Machine, RuleId = 42 }));
        Assert.Equal(StatusCode.NotFound, remove.StatusCode);
        Assert.Empty((await c.Injection.ListRulesAsync(new ListRulesRequest { MachineId = s.Machine })).Rules);
    }

    [Fact]
    public async Task A_rule_fires_on_its_schedule_and_every_firing_is_in_the_log_and_on_the_watch_stream()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 4, registerMode: 1);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        using var watch = c.Injection.WatchLog(new WatchLogRequest { MachineId = s.Machine }, cancellationToken: cts.Token);
        // Every second eligible fill, at most twice: fills 2 and 4 of 5 see mmap_changing.
        var id = await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.MmapChanging, Name = "window", Every = 2, MaxFirings = 2, UffdId = s.Uffd });
        var results = new List<Errno>();
        for (var i = 0; i < 5; i++)
            results.Add((await c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = s.Uffd, Start = A + ((ulong)i % 4 * Page), Len = Page })).Errno);

        Assert.Equal(Errno.Eagain, results[1]);
        Assert.Equal(Errno.Eagain, results[3]);
        Assert.DoesNotContain(Errno.Eagain, new[] { results[0], results[2], results[4] });
        var log = await c.Injection.ReadLogAsync(new ReadLogRequest { MachineId = s.Machine });
        Assert.Equal(2, log.Total);
        Assert.All(log.Records, r => Assert.True(r is { Site: InjectSite.MmapChanging, RuleName: "window" } && r.RuleId == id && r.UffdId == s.Uffd && r.MmId == s.Mm));
        Assert.True(log.Records[0].ModelStep < log.Records[1].ModelStep);
        var info = Assert.Single((await c.Injection.ListRulesAsync(new ListRulesRequest { MachineId = s.Machine })).Rules);
        Assert.Equal((5L, 2L), (info.Eligible, info.Firings));
        for (var i = 0; i < 2; i++)
        {
            Assert.True(await watch.ResponseStream.MoveNext(cts.Token));
            Assert.Equal(log.Records[i].Seq, watch.ResponseStream.Current.Record.Seq);
        }
        await c.Injection.RemoveRuleAsync(new RemoveRuleRequest { MachineId = s.Machine, RuleId = id });
        Assert.Empty((await c.Injection.ListRulesAsync(new ListRulesRequest { MachineId = s.Machine })).Rules);
    }

    [Fact]
    public async Task The_same_seed_fires_at_the_same_events()
    {
        var c = fx.NewClient();
        async Task<List<long>> RunAsync()
        {
            await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
            await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.MmapChanging, Probability = 0.3, Seed = 20261202 });
            for (var i = 0; i < 40; i++)
                await c.Uffd.UffdioWakeAsync(new UffdioWakeRequest { UffdId = s.Uffd, Start = A, Len = Page });
            for (var i = 0; i < 40; i++)
                await c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = s.Uffd, Start = A, Len = Page });
            return [.. (await c.Injection.ReadLogAsync(new ReadLogRequest { MachineId = s.Machine })).Records.Select(r => r.ModelStep)];
        }

        var first = await RunAsync();
        Assert.InRange(first.Count, 4, 24);
        Assert.Equal(first, await RunAsync());
    }

    [Fact]
    public async Task Read_event_first_delivers_a_REMOVE_queued_after_an_unread_PAGEFAULT_before_it()
    {
        // Firecracker's ordering bug class (#4990, #5021): the reader found no fault, a fault
        // and then a REMOVE were queued, and it read the REMOVE.
        var c = fx.NewClient();
        const ulong eventRemove = 1 << 3;
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1, features: eventRemove);
        var other = await s.NewThreadAsync();
        var fault = await c.StartOpAsync(s.Thread, Write(A, 0x11));
        var dontneed = await c.StartOpAsync(other.ThreadId, new ThreadOp { Madvise = new MadviseOp { Start = A + Page, Len = Page, Advice = 4 } });
        Assert.Equal((ThreadState.BlockedInUserfault, ThreadState.BlockedOnEvent), (fault.State, dontneed.State));
        await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.ReadEventFirst, MaxFirings = 1 });

        var (e1, m1) = await c.ReadMessageAsync(s.Uffd);
        var (e2, m2) = await c.ReadMessageAsync(s.Uffd);

        Assert.Equal((Errno.Unspecified, UffdEvent.Remove), (e1, m1!.Event));
        Assert.Equal((Errno.Unspecified, UffdEvent.Pagefault), (e2, m2!.Event));
        Assert.Equal(Errno.Unspecified, (await c.WaitOpAsync(dontneed.OpId)).Errno);
        Assert.Equal(ThreadState.BlockedInUserfault, (await c.GetThreadAsync(s.Thread)).State);
    }

    [Fact]
    public async Task A_stream_cut_after_one_message_leaves_the_next_fault_unread_for_the_next_handler()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1);
        var t2 = await s.NewThreadAsync();
        await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.StreamCut, Count = 1, UffdId = s.Uffd, MaxFirings = 1 });
        var op1 = await c.StartOpAsync(s.Thread, Write(A, 0x11));
        var op2 = await c.StartOpAsync(t2.ThreadId, Write(A + Page, 0x22));
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));

        var got = new List<UffdMsg>();
        var ex = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            await foreach (var m in c.ReadEventsAsync(s.Uffd, cts.Token))
                got.Add(m);
        });
        var poll = await c.PollAsync(s.Uffd);

        Assert.Equal(StatusCode.Unavailable, ex.StatusCode);
        Assert.Contains("cut by injection rule", ex.Status.Detail, StringComparison.Ordinal);
        Assert.Single(got);
        Assert.Equal(1u, poll.Unread);
        Assert.Equal((ThreadState.BlockedInUserfault, ThreadState.BlockedInUserfault), ((await c.GetThreadAsync(s.Thread)).State, (await c.GetThreadAsync(t2.ThreadId)).State));
        // The next handler reads the one left unread; the first stays read, its thread asleep.
        var (e, next) = await c.ReadMessageAsync(s.Uffd);
        Assert.Equal(Errno.Unspecified, e);
        Assert.NotEqual(got[0].Pagefault.Address, next!.Pagefault.Address);
        _ = (op1, op2);
    }

    [Fact]
    public async Task A_stall_until_removed_delivers_nothing_then_the_queued_fault()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        var id = await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.StreamStall, UffdId = s.Uffd, MaxFirings = 1 });
        await c.StartOpAsync(s.Thread, Write(A, 0x11));
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await using var e = c.ReadEventsAsync(s.Uffd, cts.Token).GetAsyncEnumerator(cts.Token);
        var first = e.MoveNextAsync().AsTask();

        await Task.Delay(300);
        var stalled = !first.IsCompleted;
        var unread = (await c.PollAsync(s.Uffd)).Unread;
        await c.Injection.RemoveRuleAsync(new RemoveRuleRequest { MachineId = s.Machine, RuleId = id });

        Assert.True(stalled);
        Assert.Equal(1u, unread);
        Assert.True(await first);
        Assert.Equal(A, e.Current.Pagefault.Address);
    }

    [Fact]
    public async Task Rpc_abort_fails_the_chosen_method_before_it_runs_and_rpc_delay_delays_it()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.RpcAbort, Method = "UffdioZeropage", Status = (int)StatusCode.Unavailable, MaxFirings = 1 });
        await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.RpcDelay, Method = "uffd.v1.UserfaultfdService/UffdioWake", DelayMs = 200, MaxFirings = 1 });

        var ex = await Assert.ThrowsAsync<RpcException>(async () => await c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = s.Uffd, Start = A, Len = Page }));
        var untouched = (await c.PagemapAsync(s.Mm, A, 1))[0];
        var again = await c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = s.Uffd, Start = A, Len = Page });
        var sw = System.Diagnostics.Stopwatch.StartNew();
        await c.Uffd.UffdioWakeAsync(new UffdioWakeRequest { UffdId = s.Uffd, Start = A, Len = Page });
        var delayed = sw.ElapsedMilliseconds;

        Assert.Equal(StatusCode.Unavailable, ex.StatusCode);
        Assert.Contains("aborted by injection rule", ex.Status.Detail, StringComparison.Ordinal);
        Assert.False(untouched.Present);
        Assert.Equal(Errno.Unspecified, again.Errno);
        Assert.True(delayed >= 190, $"the wake took {delayed} ms");
        Assert.Equal(2, (await c.Injection.ReadLogAsync(new ReadLogRequest { MachineId = s.Machine })).Total);
    }

    [Fact]
    public async Task A_schedule_seed_fixes_the_order_of_threads_woken_together_and_seeds_differ()
    {
        var c = fx.NewClient();
        async Task<string> OrderAsync(ulong seed)
        {
            await using var s = await CreateAsync(c, pages: 4, registerMode: 1);
            await c.Machines.ConfigureMachineAsync(new ConfigureMachineRequest { MachineId = s.Machine, Settings = new MachineSettings { ScheduleSeed = seed } });
            var threads = new List<long> { s.Thread };
            for (var i = 1; i < 4; i++)
                threads.Add((await s.NewThreadAsync()).ThreadId);
            for (var i = 0; i < 4; i++)
                await c.StartOpAsync(threads[i], Write(A + ((ulong)i * Page), (byte)(i + 1)));
            await c.TakeCompletionsAsync(s.Machine);
            // One ZEROPAGE of the four pages wakes the four threads at once.
            Assert.Equal(Errno.Unspecified, (await c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = s.Uffd, Start = A, Len = 4 * Page })).Errno);
            var done = await c.TakeCompletionsAsync(s.Machine);
            Assert.Equal(4, done.Count);
            Assert.Equal(seed, (await c.GetMachineAsync(s.Machine)).ScheduleSeed);
            return string.Join(',', done.Select(d => threads.IndexOf(d.ThreadId)));
        }

        var orders = new List<string>();
        for (ulong seed = 1; seed <= 8; seed++)
        {
            var o = await OrderAsync(seed);
            Assert.Equal(o, await OrderAsync(seed));
            orders.Add(o);
        }
        Assert.True(orders.Distinct().Count() > 1, string.Join(" ", orders));
    }

    [Fact]
    public async Task Hwpoison_leaves_a_hwpoison_entry_that_answers_the_next_access_with_SIGBUS_MCEERR_AR()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 2, features: 1);
        await c.Machines.ConfigureMachineAsync(new ConfigureMachineRequest { MachineId = s.Machine, Settings = new MachineSettings { MemoryFailure = true } });
        var wrote = await c.Threads.AccessAsync(new AccessRequest { ThreadId = s.Thread, Access = new AccessOp { Addr = A, Write = true, Touch = new TouchPattern { Pages = 2, Value = 0x11 } } });
        Assert.Equal(2u, wrote.Result.Done);
        await c.Uffd.UffdioWriteprotectAsync(new UffdioWriteprotectRequest { UffdId = s.Uffd, Start = A, Len = 2 * Page, Mode = 1 });
        var rule = await AddAsync(c, s.Machine, new InjectRule { Site = InjectSite.Hwpoison, Start = A, End = A + Page });

        var fired = await c.Injection.FireRuleAsync(new FireRuleRequest { MachineId = s.Machine, RuleId = rule });

        var record = Assert.Single(fired.Records);
        Assert.Equal(InjectSite.Hwpoison, record.Site);
        Assert.Contains("memory_failure pfn", record.Detail, StringComparison.Ordinal);
        var pm = (await c.Mm.PagemapAsync(new PagemapRequest { MmId = s.Mm, Start = A, Pages = 2 })).Entries;
        Assert.True(pm[0] is { Present: false, Swapped: true, UffdWp: false }, pm[0].ToString());
        Assert.True(pm[1] is { Present: true, UffdWp: true }, pm[1].ToString());
        var digest = (await c.Mm.DigestAsync(new DigestRequest { MmId = s.Mm, Start = A, Pages = 2 })).Pages;
        Assert.Equal(PageState.Poisoned, digest[0].State);

        // A write to the write-protected page gets SIGBUS before any uffd-wp fault: no message queued.
        var write = await c.Threads.AccessAsync(new AccessRequest { ThreadId = s.Thread, Access = new AccessOp { Addr = A, Write = true, Touch = new TouchPattern { Pages = 1, Value = 0x22 } } });
        Assert.Equal(SignalCode.BusMceerrAr, write.Result.Signal);
        Assert.Equal(0u, (await c.Uffd.PollAsync(new PollRequest { UffdId = s.Uffd })).Unread);
        var kernel = await c.Threads.AccessAsync(new AccessRequest { ThreadId = s.Thread, Access = new AccessOp { Addr = A, Origin = AccessOrigin.Kernel, Touch = new TouchPattern { Pages = 1 } } });
        Assert.Equal(Errno.Efault, kernel.Result.Errno);
        Assert.Empty(fx.Errors);
    }
}
