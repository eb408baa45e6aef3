namespace UffdGrpc.ContractTests;

/// <summary>The ThreadService: accesses that block in a userfault, started operations, thread states.</summary>
public class ThreadTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Fact]
    public async Task Access_completes_with_bytes_a_signal_or_EFAULT()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2);

        var w = await c.WriteAsync(s.Thread, A, 0x42, count: 2);
        var r = await c.ReadAsync(s.Thread, A, count: 2);
        var segv = await c.WriteAsync(s.Thread, A + Page, 0x1, count: 3);
        var efault = await c.ReadAsync(s.Thread, B, kernel: true);
        var threads = await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm });

        Assert.Equal(("ok", SignalCode.Unspecified, 2u), (w.Errno.Name(), w.Signal, w.Done));
        Assert.Equal([0x42, 0x42], r.Values.ToByteArray());
        Assert.Equal((SignalCode.SegvMaperr, 1u), (segv.Signal, segv.Done));
        Assert.Equal(("EFAULT", 14), (efault.Errno.Name(), (int)efault.Errno));
        Assert.Equal(SignalCode.Unspecified, efault.Signal);
        var t = Assert.Single(threads.Threads);
        Assert.Equal((s.Thread, s.Tid, ThreadState.Idle, 0L), (t.ThreadId, t.Tid, t.State, t.OpId));
    }

    [Fact]
    public async Task Access_stays_pending_while_the_thread_sleeps_in_a_userfault()
    {
        // Arrange
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 2);
        await c.WriteAsync(s.Thread, A, 0x11);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 1));

        // Act
        var write = c.WriteAsync(s.Thread, A, 0x22);
        await EventuallyAsync(async () => (await c.GetThreadAsync(s.Thread)).State == ThreadState.BlockedInUserfault, "the writer sleeps in the userfault");
        var blocked = await c.GetThreadAsync(s.Thread);
        var stillPending = !write.IsCompleted;
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 0));
        var done = await write;

        // Assert
        Assert.True(stillPending);
        Assert.Equal(s.Uffd, blocked.BlockedOnUffdId);
        Assert.NotEqual(0, blocked.OpId);
        Assert.Equal("ok", done.Errno.Name());
        Assert.Equal(0x22, (await c.ReadAsync(s.Thread, A)).Values[0]);
    }

    [Fact]
    public async Task Started_operations_report_states_and_complete_once_through_wait_or_completions()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1);
        var t2 = await s.NewThreadAsync();

        var op1 = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A, write: true, value: 7) });
        var op2 = await c.StartOpAsync(t2.ThreadId, new ThreadOp { Access = UffdClient.Touch(A + Page, write: false) });
        var busy = await Assert.ThrowsAsync<RpcException>(() => c.StartOpAsync(s.Thread, new ThreadOp { Fork = new ForkOp() }));
        var none = await c.TakeCompletionsAsync(s.Machine);
        var z2 = await c.ZeropageAsync(s.Uffd, A + Page, Page);
        var z1 = await c.ZeropageAsync(s.Uffd, A, Page);
        var completions = await c.TakeCompletionsAsync(s.Machine);
        var waitTaken = await Assert.ThrowsAsync<RpcException>(() => c.WaitOpAsync(op1.OpId));
        var op3 = await c.StartOpAsync(s.Thread, new ThreadOp { Populate = new PopulateOp { Start = A, Len = 2 * Page, Write = true } });
        var waited = await c.WaitOpAsync(op3.OpId);

        Assert.Equal(ThreadState.BlockedInUserfault, op1.State);
        Assert.Equal(ThreadState.BlockedInUserfault, op2.State);
        Assert.Equal(StatusCode.FailedPrecondition, busy.StatusCode);
        Assert.Equal("THREAD_BUSY", ErrorInfoOf(busy)!.Reason);
        Assert.Empty(none);
        Assert.Equal((Errno.Unspecified, 4096L), (z2.Errno, z2.Field));
        Assert.Equal(Errno.Unspecified, z1.Errno);
        Assert.Equal([op2.OpId, op1.OpId], completions.Select(r => r.OpId));
        Assert.Equal([t2.ThreadId, s.Thread], completions.Select(r => r.ThreadId));
        Assert.Equal(StatusCode.NotFound, waitTaken.StatusCode);
        Assert.Equal("ok", waited.Errno.Name());
        Assert.Empty(await c.TakeCompletionsAsync(s.Machine));
    }

    [Fact]
    public async Task Many_concurrent_threads_each_block_and_are_resolved_by_one_handler()
    {
        // Arrange
        const int n = 32;
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: n, registerMode: 2);
        await c.WriteAsync(s.Thread, A, 0x01, count: n);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, n * Page, 1));
        var threads = new List<long>();
        for (var i = 0; i < n; i++)
            threads.Add((await s.NewThreadAsync()).ThreadId);
        using var stop = new CancellationTokenSource();
        var handler = new FaultHandlerLoop(fx.NewClient(), s.Uffd);
        var serving = handler.RunAsync(stop.Token);

        // Act: every thread writes its own page at once, from its own call.
        var writes = threads.Select((t, i) => Task.Run(() => c.WriteAsync(t, A + ((ulong)i * Page), (byte)(0x80 + i)))).ToArray();
        var results = await Task.WhenAll(writes).WaitAsync(TimeSpan.FromSeconds(60));
        await EventuallyAsync(() => Task.FromResult(handler.Handled == n), "the handler counted every fault it resolved");
        await stop.CancelAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => serving);

        // Assert
        Assert.All(results, r => Assert.Equal("ok", r.Errno.Name()));
        Assert.Equal(n, handler.Handled);
        var values = await c.ReadAsync(s.Thread, A, count: n);
        Assert.Equal(Enumerable.Range(0, n).Select(i => (byte)(0x80 + i)), values.Values.ToByteArray());
        var poll = await c.PollAsync(s.Uffd);
        Assert.Equal((0u, 0u), (poll.Unread, poll.BlockedFaults));
    }
}
