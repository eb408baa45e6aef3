namespace UffdGrpc.ContractTests;

/// <summary>
/// Kernel outcomes of the fill ioctls are results: status OK, the errno in the response's
/// <c>errno</c> field, and the result field exactly as the kernel left it (-errno written
/// into <c>copy</c>, or absent when the kernel returned before writing it).
/// </summary>
public class InBandErrnoTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    private const ulong Src = 0x7f00_0000_0000;

    private static Task<UffdioCopyResponse> CopyAsync(UffdClient c, long uffd, ulong dst, byte fill, ulong len = Page) =>
        OkAsync(c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = uffd, Dst = dst, Src = Src, Len = len, Fill = fill }));

    [Fact]
    public async Task Copy_onto_a_present_page_is_EEXIST_with_copy_minus_17_and_leaves_the_page_alone()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        Assert.Equal(Errno.Unspecified, (await CopyAsync(c, s.Uffd, A, 0x11)).Errno);

        var r = await CopyAsync(c, s.Uffd, A, 0x22);

        Assert.Equal((Errno.Eexist, (long?)-17), (r.Errno, r.Copy));
        Assert.Equal("EEXIST", r.Errno.Name());
        Assert.Equal(0x11, (await c.ReadAsync(s.Thread, A)).Values[0]);
    }

    public static TheoryData<string> Changers => ["madvise", "munmap"];

    [Theory]
    [MemberData(nameof(Changers))]
    public async Task Copy_while_an_unread_event_keeps_mmap_changing_is_EAGAIN_with_copy_minus_11(string changer)
    {
        // Arrange: page 0 is dropped (MADV_DONTNEED raises REMOVE) or unmapped (UNMAP); the
        // syscall stays pending, mmap_changing > 0, until its event is read.
        var c = fx.NewClient();
        const ulong eventRemove = 1 << 3, eventUnmap = 1 << 6;
        await using var s = await CreateAsync(c, pages: 2, registerMode: 1, features: changer == "madvise" ? eventRemove : eventUnmap);
        Assert.Equal(Errno.Unspecified, (await CopyAsync(c, s.Uffd, A, 0x11)).Errno);
        var op = await c.StartOpAsync(s.Thread, changer == "madvise"
            ? new ThreadOp { Madvise = new MadviseOp { Start = A, Len = Page, Advice = 4 } }
            : new ThreadOp { Munmap = new MunmapOp { Start = A, Len = Page } });
        var during = await c.PollAsync(s.Uffd);

        // Act
        var r = await CopyAsync(c, s.Uffd, A + Page, 0x22);
        var untouched = (await c.PagemapAsync(s.Mm, A + Page, 1))[0];
        var (readErrno, msg) = await c.ReadMessageAsync(s.Uffd);
        var done = await c.WaitOpAsync(op.OpId);
        var after = await CopyAsync(c, s.Uffd, A + Page, 0x22);

        // Assert
        Assert.Equal(ThreadState.BlockedOnEvent, op.State);
        Assert.True(during is { Unread: 1, MmapChanging: 1 });
        Assert.Equal((Errno.Eagain, (long?)-11), (r.Errno, r.Copy));
        Assert.False(untouched.Present);
        Assert.Equal(Errno.Unspecified, readErrno);
        Assert.Equal(changer == "madvise" ? UffdEvent.Remove : UffdEvent.Unmap, msg!.Event);
        Assert.Equal(Errno.Unspecified, done.Errno);
        Assert.Equal((Errno.Unspecified, (long?)4096), (after.Errno, after.Copy));
        Assert.Equal(0, (await c.PollAsync(s.Uffd)).MmapChanging);
        Assert.Equal(0x22, (await c.ReadAsync(s.Thread, A + Page)).Values[0]);
    }

    [Fact]
    public async Task Copy_into_a_VMA_not_registered_with_the_uffd_is_ENOENT_with_copy_minus_2()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, B, Page, 3));

        var unregistered = await CopyAsync(c, s.Uffd, B, 0x33);
        var noVma = await CopyAsync(c, s.Uffd, B + (16 * Page), 0x33);

        Assert.Equal((Errno.Enoent, (long?)-2), (unregistered.Errno, unregistered.Copy));
        Assert.Equal((Errno.Enoent, (long?)-2), (noVma.Errno, noVma.Copy));
        Assert.False((await c.PagemapAsync(s.Mm, B, 1))[0].Present);
    }

    [Fact]
    public async Task An_ioctl_on_a_uffd_whose_process_exited_is_ESRCH_and_leaves_the_field_unwritten()
    {
        // mmget_not_zero fails once the mm is gone: userfaultfd_copy returns -ESRCH before
        // put_user of uffdio_copy.copy, so the field is absent.
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);
        await c.DestroyMmAsync(s.Mm);

        var copy = await CopyAsync(c, s.Uffd, A, 0x44);
        var zero = await OkAsync(c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = s.Uffd, Start = A, Len = Page }));
        var poll = await c.PollAsync(s.Uffd);

        Assert.Equal((Errno.Esrch, (long?)null), (copy.Errno, copy.Copy));
        Assert.Equal((Errno.Esrch, (long?)null), (zero.Errno, zero.Zeropage));
        Assert.False(poll.Released);
        Assert.Equal(Errno.Unspecified, await c.CloseUffdAsync(s.Uffd));
    }
}
