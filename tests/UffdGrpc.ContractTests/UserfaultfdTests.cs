namespace UffdGrpc.ContractTests;

/// <summary>Every userfaultfd RPC: create, API, the range ioctls with their result fields, poll, read, close.</summary>
public class UserfaultfdTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Fact]
    public async Task Create_api_register_unregister_and_poll()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2);

        var (badFlags, _) = await c.CreateUffdAsync(s.Mm, flags: 0x4);
        var (ok, uffd) = await c.CreateUffdAsync(s.Mm, flags: 0x80801);
        var beforeApi = await c.PollAsync(uffd);
        var api = await c.ApiAsync(uffd, features: 1 << 8);
        var again = await c.ApiAsync(uffd);
        var reg = await c.RegisterAsync(uffd, A, 2 * Page, 3);
        var badReg = await c.RegisterAsync(uffd, A, 2 * Page, 0);
        var unreg = await c.UnregisterAsync(uffd, A + Page, Page);
        var poll = await c.PollAsync(uffd);
        var vmas = await c.ListVmasAsync(s.Mm);

        Assert.Equal(Errno.Einval, badFlags);
        Assert.Equal(Errno.Unspecified, ok);
        Assert.True(beforeApi is { Pollerr: true, ApiDone: false, NonBlocking: true });
        Assert.Equal((Errno.Unspecified, 0x1ffffUL, (1UL << 0) | (1UL << 1) | (1UL << 63)), api);
        Assert.Equal(Errno.Einval, again.Errno);
        Assert.Equal(Errno.Unspecified, reg.Errno);
        Assert.NotEqual(0UL, reg.Ioctls & (1UL << 3));
        Assert.Equal(Errno.Einval, badReg.Errno);
        Assert.Equal(Errno.Unspecified, unreg);
        Assert.True(poll is { Pollin: false, Pollerr: false, ApiDone: true, Unread: 0, Released: false });
        Assert.Equal((ulong)0x1ffff & (1 << 8), poll.Features & (1 << 8));
        Assert.Equal([uffd, 0L], vmas.Select(v => v.UffdId));
    }

    [Fact]
    public async Task Copy_zeropage_and_wake_resolve_missing_faults_and_results_are_signed()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 4, registerMode: 1);

        var copy = await c.CopyAsync(s.Uffd, A, Enumerable.Repeat((byte)0x5a, (int)Page).ToArray());
        var exists = await c.CopyAsync(s.Uffd, A, new byte[Page]);
        var zero = await c.ZeropageAsync(s.Uffd, A + Page, Page);
        var fill = await c.CopyFillAsync(s.Uffd, A + (2 * Page), 0x7f00_0000_0000, 0x33, Page, mode: 1);
        var wake = await c.WakeAsync(s.Uffd, A, 4 * Page);
        var values = await c.ReadAsync(s.Thread, A, count: 3);

        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), copy);
        Assert.Equal(new FillOutcome(Errno.Eexist, -17), exists);
        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), zero);
        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), fill);
        Assert.Equal(Errno.Unspecified, wake);
        Assert.Equal([0x5a, 0x00, 0x33], values.Values.ToByteArray());
    }

    [Fact]
    public async Task A_field_the_kernel_left_untouched_is_absent_not_zero()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1);
        var (_, uffd) = await c.CreateUffdAsync(s.Mm);

        // Before UFFDIO_API the ioctl fails without writing uffdio_copy.copy.
        var r = await OkAsync(c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = uffd, Dst = A, Src = 0x7f00_0000_0000, Len = Page, Fill = 1 }));
        var zero = await OkAsync(c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = uffd, Start = A, Len = Page }));

        Assert.Equal(Errno.Einval, r.Errno);
        Assert.Null(r.Copy);
        Assert.Equal((Errno.Einval, (long?)null), (zero.Errno, zero.Zeropage));
        Assert.Equal(new FillOutcome(Errno.Einval, null), await c.CopyFillAsync(uffd, A, 0x7f00_0000_0000, 1, Page));
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
    }

    [Fact]
    public async Task Continue_maps_the_page_cache_page_for_a_minor_fault()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c);
        var f = await c.CreateFileAsync(s.Machine, "shm", shmem: true, size: Page);
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, A, Page, 3, shared: true, fileId: f.FileId));
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, B, Page, 3, shared: true, fileId: f.FileId));
        await c.WriteAsync(s.Thread, B, 0x66);
        var (_, uffd) = await c.CreateUffdAsync(s.Mm);
        await c.ApiAsync(uffd, features: 1 << 10);
        Assert.Equal(Errno.Unspecified, (await c.RegisterAsync(uffd, A, Page, 4)).Errno);

        var op = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A, write: false) });
        var (_, msg) = await c.ReadMessageAsync(uffd);
        var cont = await c.ContinueAsync(uffd, A, Page);
        var r = await c.WaitOpAsync(op.OpId);

        Assert.Equal(ThreadState.BlockedInUserfault, op.State);
        Assert.True(msg!.Pagefault is { Minor: true, Write: false });
        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), cont);
        Assert.Equal(0x66, r.Values[0]);
    }

    [Fact]
    public async Task Poison_makes_an_access_raise_SIGBUS()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1, features: 1 << 14);

        var poison = await c.PoisonAsync(s.Uffd, A, Page);
        var r = await c.ReadAsync(s.Thread, A);

        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), poison);
        Assert.Equal(SignalCode.BusAdrerr, r.Signal);
    }

    [Fact]
    public async Task Move_takes_the_source_page_and_reports_bytes_moved()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1, features: 1 << 16);
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, B, Page, 3));
        await c.WriteAsync(s.Thread, B, 0x77);

        var move = await c.MoveAsync(s.Uffd, A, B, Page, callerMmId: s.Mm);
        var again = await c.MoveAsync(s.Uffd, A, B, Page);
        var dst = await c.ReadAsync(s.Thread, A);

        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), move);
        Assert.Equal(Errno.Eexist, again.Errno);
        Assert.Equal(0x77, dst.Values[0]);
    }

    [Fact]
    public async Task Read_is_non_blocking_and_close_wakes_blocked_faults()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1, features: 1 << 8);

        var empty = await c.ReadMessageAsync(s.Uffd);
        var op = await c.StartOpAsync(s.Thread, new ThreadOp { Access = UffdClient.Touch(A + 5, write: true, value: 9) });
        var poll = await c.PollAsync(s.Uffd);
        var (e, msg) = await c.ReadMessageAsync(s.Uffd);
        var afterRead = await c.PollAsync(s.Uffd);
        var close = await c.CloseUffdAsync(s.Uffd);
        var r = await c.WaitOpAsync(op.OpId);
        var closed = await c.WriteprotectAsync(s.Uffd, A, Page, 1);
        var closeAgain = await OkAsync(c.Uffd.CloseAsync(new CloseRequest { UffdId = s.Uffd }));
        var readClosed = await OkAsync(c.Uffd.ReadAsync(new ReadRequest { UffdId = s.Uffd }));
        var polled = await c.PollAsync(s.Uffd);

        Assert.Equal((Errno.Eagain, (UffdMsg?)null), empty);
        Assert.True(poll is { Pollin: true, Unread: 1, BlockedFaults: 1 });
        Assert.Equal(Errno.Unspecified, e);
        Assert.Equal(UffdEvent.Pagefault, msg!.Event);
        Assert.Equal(s.Uffd, msg.UffdId);
        Assert.True(msg.Pagefault is { Write: true, Wp: false, Address: A });
        Assert.Equal((uint)s.Tid, msg.Pagefault.Ptid);
        Assert.True(afterRead is { Pollin: false, Unread: 0, BlockedFaults: 1 });
        Assert.Equal("ok", r.Errno.Name());
        Assert.Equal(Errno.Unspecified, close);
        Assert.Equal(Errno.Ebadf, closed);
        Assert.Equal(Errno.Ebadf, closeAgain.Errno);
        Assert.Equal((Errno.Ebadf, (UffdMsg?)null), (readClosed.Errno, readClosed.Msg));
        Assert.True(polled.Released);
    }
}
