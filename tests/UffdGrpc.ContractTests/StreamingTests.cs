namespace UffdGrpc.ContractTests;

/// <summary>
/// The event stream: what "read" means, cancellation and deadlines, a handler that
/// disconnects, several handlers on one uffd and on one address space, and events that
/// keep a syscall pending until they are read.
/// </summary>
public class StreamingTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    private static async Task<UffdMsg> NextAsync(IAsyncStreamReader<ReadEventsResponse> stream)
    {
        Assert.True(await stream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(20)), "the stream ended");
        return stream.Current.Msg;
    }

    private static Task<long> BlockedWriterAsync(UffdClient c, Sandbox s, long thread, ulong addr) =>
        c.StartOpAsync(thread, new ThreadOp { Access = UffdClient.Touch(addr, write: true, value: 0x99) }).ContinueWith(t => t.Result.OpId, TaskScheduler.Default);

    [Fact]
    public async Task A_fault_is_read_when_handed_to_the_stream_and_the_write_completes_after_unprotect()
    {
        // Arrange
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 2, features: 1 << 8);
        await c.WriteAsync(s.Thread, A, 0x11);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 1));
        using var stream = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd });
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "the stream is open");

        // Act
        var write = c.WriteAsync(s.Thread, A, 0x22);
        var msg = await NextAsync(stream.ResponseStream);
        var poll = await c.PollAsync(s.Uffd);
        var pending = !write.IsCompleted;
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 0));
        var r = await write;

        // Assert
        Assert.True(msg.Pagefault is { Write: true, Wp: true, Address: A });
        Assert.Equal((uint)s.Tid, msg.Pagefault.Ptid);
        Assert.True(poll is { Unread: 0, BlockedFaults: 1, Pollin: false });
        Assert.True(pending);
        Assert.Equal("ok", r.Errno.Name());
        Assert.Empty(fx.Errors);
    }

    [Fact]
    public async Task Cancelling_a_stream_ends_it_with_Cancelled_and_the_server_stops_reading()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);

        using var cts = new CancellationTokenSource();
        using var cancelled = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd }, cancellationToken: cts.Token);
        var move = cancelled.ResponseStream.MoveNext(CancellationToken.None);
        await cts.CancelAsync();
        var ce = await Assert.ThrowsAsync<RpcException>(() => move);
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 0, "the server ended the stream");
        // A fault raised afterwards stays queued for the next reader.
        var op = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A, write: true) });

        Assert.Equal(StatusCode.Cancelled, ce.StatusCode);
        Assert.Equal(1u, (await c.PollAsync(s.Uffd)).Unread);
        Assert.Equal(UffdEvent.Pagefault, (await c.ReadMessageAsync(s.Uffd)).Message!.Event);
        Assert.Equal(Errno.Unspecified, (await c.ZeropageAsync(s.Uffd, A, Page)).Errno);
        Assert.Equal("ok", (await c.WaitOpAsync(op.OpId)).Errno.Name());
    }

    [Fact]
    public async Task A_stream_ends_when_the_uffd_is_closed_and_an_unknown_uffd_is_NotFound()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 2);
        using var stream = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd });
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "the stream is open");

        await c.CloseUffdAsync(s.Uffd);
        var more = await stream.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(20));
        using var unknown = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = 987_654_321 });
        var nf = await Assert.ThrowsAsync<RpcException>(() => unknown.ResponseStream.MoveNext(CancellationToken.None));

        Assert.False(more);
        Assert.Equal(StatusCode.NotFound, nf.StatusCode);
    }

    [Fact]
    public async Task A_handler_that_disconnects_keeps_what_it_read_and_leaves_the_rest_to_another_handler()
    {
        // Arrange: two pages write-protected, two writers.
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 2);
        await c.WriteAsync(s.Thread, A, 0x11, count: 2);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, 2 * Page, 1));
        var t2 = (await s.NewThreadAsync()).ThreadId;

        // Act 1: handler A reads the first fault, then disconnects without resolving it.
        using (var cts = new CancellationTokenSource())
        {
            using var a = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd }, cancellationToken: cts.Token);
            await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "handler A is reading");
            await BlockedWriterAsync(c, s, s.Thread, A);
            var first = await NextAsync(a.ResponseStream);
            Assert.Equal(A, first.Pagefault.Address);
            await cts.CancelAsync();
        }
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 0, "handler A is gone");
        var afterDisconnect = await c.PollAsync(s.Uffd);
        var firstThread = await c.GetThreadAsync(s.Thread);

        // Act 2: a second fault; handler B gets it (not the one A read).
        using var b = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd });
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "handler B is reading");
        await BlockedWriterAsync(c, s, t2, A + Page);
        var second = await NextAsync(b.ResponseStream);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A + Page, Page, 0));
        var stillBlocked = await c.GetThreadAsync(s.Thread);
        // The fault A read stays read: B resolves it by address, as after a lost read(2).
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 0));
        var done = await c.TakeCompletionsAsync(s.Machine);

        // Assert
        Assert.True(afterDisconnect is { Unread: 0, BlockedFaults: 1 });
        Assert.Equal(ThreadState.BlockedInUserfault, firstThread.State);
        Assert.Equal(A + Page, second.Pagefault.Address);
        Assert.Equal(ThreadState.BlockedInUserfault, stillBlocked.State);
        Assert.Equal([t2, s.Thread], done.Select(r => r.ThreadId));
        Assert.All(done, r => Assert.Equal("ok", r.Errno.Name()));
    }

    [Fact]
    public async Task Two_streams_on_one_uffd_each_own_the_messages_they_read()
    {
        const int n = 8;
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: n, registerMode: 1);
        using var h1 = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd });
        using var h2 = fx.NewClient().Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd });
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 2, "both handlers are reading");
        var seen = new System.Collections.Concurrent.ConcurrentBag<(int Handler, ulong Addr)>();

        async Task ServeAsync(int id, IAsyncStreamReader<ReadEventsResponse> stream)
        {
            while (seen.Count < n && await stream.MoveNext(CancellationToken.None))
            {
                seen.Add((id, stream.Current.Msg.Pagefault.Address));
                Assert.Equal(Errno.Unspecified, (await c.ZeropageAsync(s.Uffd, stream.Current.Msg.Pagefault.Address, Page)).Errno);
            }
        }

        var serve1 = ServeAsync(1, h1.ResponseStream);
        var serve2 = ServeAsync(2, h2.ResponseStream);
        var threads = new List<long>();
        for (var i = 0; i < n; i++)
            threads.Add((await s.NewThreadAsync()).ThreadId);
        var reads = await Task.WhenAll(threads.Select((t, i) => c.ReadAsync(t, A + ((ulong)i * Page)))).WaitAsync(TimeSpan.FromSeconds(30));

        Assert.All(reads, r => Assert.Equal("ok", r.Errno.Name()));
        Assert.Equal(n, seen.Count);
        Assert.Equal(n, seen.Select(x => x.Addr).Distinct().Count());
        Assert.Equal(0u, (await c.PollAsync(s.Uffd)).Unread);
        _ = serve1;
        _ = serve2;
    }

    [Fact]
    public async Task Many_uffds_one_address_space_fill_through_another_mapping_then_wake_the_faulting_uffd()
    {
        // QEMU's model: guest RAM is a memfd mapped twice; uffd1 serves the guest view A,
        // uffd2 the handler's view B. A fault on A is filled by copying into B (through uffd2),
        // then woken with UFFDIO_WAKE on uffd1.
        var c = fx.NewClient();
        await using var s = await CreateAsync(c);
        var f = await c.CreateFileAsync(s.Machine, "guest-ram", shmem: true, size: 4 * Page);
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, A, 4 * Page, 3, shared: true, fileId: f.FileId));
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, B, 4 * Page, 3, shared: true, fileId: f.FileId));
        var (_, u1) = await c.CreateUffdAsync(s.Mm);
        var (_, u2) = await c.CreateUffdAsync(s.Mm);
        await c.ApiAsync(u1);
        await c.ApiAsync(u2);
        Assert.Equal(Errno.Unspecified, (await c.RegisterAsync(u1, A, 4 * Page, 1)).Errno);
        Assert.Equal(Errno.Unspecified, (await c.RegisterAsync(u2, B, 4 * Page, 1)).Errno);
        var guestHandler = fx.NewClient();
        var fillHandler = fx.NewClient();
        using var stream = guestHandler.Uffd.ReadEvents(new ReadEventsRequest { UffdId = u1 });
        await EventuallyAsync(async () => (await c.PollAsync(u1)).Readers == 1, "the guest handler is reading");

        var read = c.ReadAsync(s.Thread, A + (2 * Page));
        var msg = await NextAsync(stream.ResponseStream);
        var page = msg.Pagefault.Address;
        var fill = await fillHandler.CopyFillAsync(u2, B + (page - A), 0x7f00_0000_0000, 0xab, Page);
        var blockedAfterFill = await c.GetThreadAsync(s.Thread);
        var wake = await guestHandler.WakeAsync(u1, page, Page);
        var r = await read;

        Assert.Equal(A + (2 * Page), page);
        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), fill);
        Assert.Equal(ThreadState.BlockedInUserfault, blockedAfterFill.State);
        Assert.Equal(Errno.Unspecified, wake);
        Assert.Equal(0xab, r.Values[0]);
    }

    [Fact]
    public async Task Fork_stays_pending_until_its_event_is_read_and_the_child_uffd_can_be_served()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 2, features: 1 << 1);
        await c.WriteAsync(s.Thread, A, 0x11);

        var fork = c.ForkAsync(s.Mm, s.Thread);
        await EventuallyAsync(async () => (await c.GetThreadAsync(s.Thread)).State == ThreadState.BlockedOnEvent, "fork waits for its event to be read");
        var poll = await c.PollAsync(s.Uffd);
        var copyDuringFork = await c.ZeropageAsync(s.Uffd, A, Page);
        using var stream = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd });
        var msg = await NextAsync(stream.ResponseStream);
        var child = await fork;
        var childUffd = await c.PollAsync(msg.Fork.UffdId);
        var childVmas = await c.ListVmasAsync(child.ChildMmId);

        Assert.True(poll is { Unread: 1, MmapChanging: 1 });
        Assert.Equal(new FillOutcome(Errno.Eagain, -11), copyDuringFork);
        Assert.Equal(UffdEvent.Fork, msg.Event);
        Assert.Equal(Errno.Unspecified, child.Errno);
        Assert.True(childUffd is { ApiDone: true, Released: false });
        Assert.Equal(msg.Fork.UffdId, childVmas.Single().UffdId);
        Assert.Equal(0, (await c.PollAsync(s.Uffd)).MmapChanging);
    }

    [Fact]
    public async Task Serve_hands_out_faults_in_batches_and_answers_each_resolution_in_band_in_order()
    {
        // Arrange
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1);
        await using var session = await fx.NewClient().ServeAsync(s.Uffd);
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "the Serve stream is reading");
        var op = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A, write: false) });

        // Act
        var batch = await session.Messages.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(20));
        var page = Enumerable.Repeat((byte)0x5a, (int)Page).ToArray();
        var results = await session.ResolveAsync(
        [
            ServeSession.Copy(A, page, mode: 1, tag: 1),
            ServeSession.Copy(A, page, tag: 2),
            ServeSession.Zeropage(A + Page, tag: 3),
            ServeSession.Wake(A, tag: 4),
        ]).WaitAsync(TimeSpan.FromSeconds(20));
        var r = await c.WaitOpAsync(op.OpId);

        // Assert
        var msg = Assert.Single(batch);
        Assert.True(msg is { Event: UffdEvent.Pagefault, Pagefault.Address: A });
        Assert.Equal(s.Uffd, msg.UffdId);
        Assert.Equal([1UL, 2UL, 3UL, 4UL], results.Select(x => x.Tag));
        Assert.Equal([Errno.Unspecified, Errno.Eexist, Errno.Unspecified, Errno.Unspecified], results.Select(x => x.Errno));
        Assert.Equal([4096L, -17L, 4096L, null], results.Select(x => x.Field));
        Assert.Equal(Errno.Unspecified, r.Errno);
        Assert.Equal(0x5a, r.Values[0]);
        Assert.Equal((0u, 0u), ((await c.PollAsync(s.Uffd)).Unread, (await c.PollAsync(s.Uffd)).BlockedFaults));
    }

    [Fact]
    public async Task A_malformed_Serve_resolution_fails_the_stream_with_InvalidArgument_and_runs_nothing()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1);
        using var call = c.Uffd.Serve();
        await call.RequestStream.WriteAsync(new ServeRequest { UffdId = s.Uffd });
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "the Serve stream is reading");

        // A good resolution first, then one with no op: the whole request is rejected before any runs.
        await call.RequestStream.WriteAsync(new ServeRequest { Resolutions = { ServeSession.Zeropage(A, tag: 1), new Resolution { Tag = 2 } } });
        var ex = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(20)));
        using var unknown = c.Uffd.Serve();
        await unknown.RequestStream.WriteAsync(new ServeRequest { UffdId = 987_654_321 });
        var nf = await Assert.ThrowsAsync<RpcException>(() => unknown.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(20)));

        Assert.Equal(StatusCode.InvalidArgument, ex.StatusCode);
        Assert.Equal("resolutions[1].op", BadFieldOf(ex));
        Assert.Equal(StatusCode.NotFound, nf.StatusCode);
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 0, "the failed stream stopped reading");
    }
}
