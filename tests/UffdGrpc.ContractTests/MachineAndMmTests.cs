namespace UffdGrpc.ContractTests;

/// <summary>MachineService and MmService over a real HTTP/2 channel.</summary>
public class MachineAndMmTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Fact]
    public async Task Machines_create_get_list_configure_and_destroy()
    {
        // Arrange
        var c = fx.NewClient();

        // Act
        var m = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Profile = KernelProfile.V57, Settings = new MachineSettings { Swap = true } })).Machine;
        var configured = await c.ConfigureMachineAsync(m.MachineId, swap: null, softDirty: true);
        var listed = await c.Machines.ListMachinesAsync(new ListMachinesRequest());
        var got = await c.GetMachineAsync(m.MachineId);
        await c.DestroyMachineAsync(m.MachineId);

        // Assert
        Assert.Equal(KernelProfile.V57, m.Profile);
        Assert.True(m.Swap);
        Assert.False(m.SoftDirty);
        Assert.Equal(0x1ffUL, m.UffdFeatures);
        Assert.False(m.PagemapScan);
        Assert.Equal(ThpMode.Madvise, m.Thp);
        Assert.Equal(64UL << 20, m.MaxCopyBytes);
        Assert.True(configured.Swap);
        Assert.True(configured.SoftDirty);
        Assert.Contains(listed.Machines, x => x.MachineId == m.MachineId);
        Assert.True(got.SoftDirty);
        var gone = await Assert.ThrowsAsync<RpcException>(() => c.GetMachineAsync(m.MachineId));
        Assert.Equal(StatusCode.NotFound, gone.StatusCode);
        var reference = await c.CreateMachineAsync();
        Assert.Equal(KernelProfile.V618, reference.Profile);
        Assert.Equal(0x1ffffUL, reference.UffdFeatures);
        Assert.True(reference.PagemapScan);
        await c.DestroyMachineAsync(reference.MachineId);
        Assert.Empty(fx.Errors);
    }

    [Fact]
    public async Task The_read_fault_zero_page_setting_is_created_reported_and_configured()
    {
        var c = fx.NewClient();

        var m = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { ReadFaultZeroPage = false } })).Machine;
        var on = (await c.Machines.ConfigureMachineAsync(new ConfigureMachineRequest { MachineId = m.MachineId, Settings = new MachineSettings { ReadFaultZeroPage = true } })).Machine;
        var reference = await c.CreateMachineAsync();
        await c.DestroyMachineAsync(m.MachineId);
        await c.DestroyMachineAsync(reference.MachineId);

        Assert.False(m.ReadFaultZeroPage);
        Assert.True(on.ReadFaultZeroPage);
        Assert.True(reference.ReadFaultZeroPage);
        Assert.Empty(fx.Errors);
    }

    [Fact]
    public async Task A_6_1_machine_has_its_features_and_built_in_soft_dirty_and_memory_failure()
    {
        var c = fx.NewClient();

        var m = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Profile = KernelProfile.V61 })).Machine;
        var swapped = await c.ConfigureMachineAsync(m.MachineId, swap: true, softDirty: null);
        var off = await Assert.ThrowsAsync<RpcException>(() => c.ConfigureMachineAsync(m.MachineId, swap: null, softDirty: false));
        var created = await Assert.ThrowsAsync<RpcException>(() => c.Machines.CreateMachineAsync(
            new CreateMachineRequest { Profile = KernelProfile.V61, Settings = new MachineSettings { MemoryFailure = false } }).ResponseAsync);
        var after = await c.GetMachineAsync(m.MachineId);
        await c.DestroyMachineAsync(m.MachineId);

        Assert.Equal(KernelProfile.V61, m.Profile);
        Assert.Equal(0x1fffUL, m.UffdFeatures);
        Assert.False(m.PagemapScan);
        Assert.True(m.SoftDirty);
        Assert.True(m.MemoryFailure);
        Assert.True(swapped.Swap);
        Assert.Equal(StatusCode.InvalidArgument, off.StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, created.StatusCode);
        Assert.True(after.SoftDirty);
        Assert.Empty(fx.Errors);
    }

    [Fact]
    public async Task Mm_create_list_destroy_and_threads_die_with_their_process()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1);
        var other = await c.CreateMmAsync(s.Machine);

        var list = await c.Mm.ListMmsAsync(new ListMmsRequest { MachineId = s.Machine });
        await c.DestroyMmAsync(other);
        var after = await c.Mm.ListMmsAsync(new ListMmsRequest { MachineId = s.Machine });
        var machine = await c.GetMachineAsync(s.Machine);

        // Listed in id order; ids are random, so not in creation order.
        Assert.Equal(new[] { s.Mm, other }.Order(), list.Mms.Select(m => m.MmId));
        Assert.Equal([s.Thread], list.Mms.Single(m => m.MmId == s.Mm).ThreadIds);
        Assert.Equal(1, list.Mms.Single(m => m.MmId == s.Mm).VmaCount);
        Assert.True(after.Mms.Single(m => m.MmId == other).Exited);
        Assert.Equal([s.Mm], machine.MmIds);
        await c.DestroyMmAsync(s.Mm);
        Assert.Equal(ThreadState.Exited, (await c.GetThreadAsync(s.Thread)).State);
        var e = await Assert.ThrowsAsync<RpcException>(() => c.CreateThreadAsync(s.Mm));
        Assert.Equal(StatusCode.FailedPrecondition, e.StatusCode);
    }

    [Fact]
    public async Task Mmap_mprotect_and_vma_views_split_as_the_kernel_does()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 3);

        Assert.Equal(Errno.Unspecified, await c.MprotectAsync(s.Mm, A + Page, Page, 1));
        var vmas = await c.ListVmasAsync(s.Mm);
        var overlap = await c.MmapAsync(s.Mm, A + 1, Page, 3);
        var badProt = await c.MprotectAsync(s.Mm, A + 1, Page, 1);

        Assert.Equal(["rw-p", "r--p", "rw-p"], vmas.Select(v => v.Perms));
        Assert.Equal([A, A + Page, A + (2 * Page)], vmas.Select(v => v.Start));
        Assert.Equal(Errno.Einval, overlap);
        Assert.Equal(Errno.Einval, badProt);
        var w = await c.WriteAsync(s.Thread, A + Page, 0x11);
        Assert.Equal(SignalCode.SegvAccerr, w.Signal);
    }

    [Fact]
    public async Task Munmap_mremap_madvise_and_clear_refs()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 4);
        await c.WriteAsync(s.Thread, A, 0x11, count: 4);

        var dontneed = await c.MadviseAsync(s.Mm, A, Page, 4);
        var zeroAgain = await c.ReadAsync(s.Thread, A, count: 2);
        var remap = await c.MremapAsync(s.Mm, A + Page, Page, B);
        var moved = await c.ReadAsync(s.Thread, B);
        var unmap = await c.MunmapAsync(s.Mm, A + (2 * Page), Page, s.Thread);
        var gone = await c.ReadAsync(s.Thread, A + (2 * Page));
        var clear = await c.ClearRefsAsync(s.Mm, "4");
        var badClear = await c.ClearRefsAsync(s.Mm, "9");
        var badAdvice = await Assert.ThrowsAsync<RpcException>(() => c.MadviseAsync(s.Mm, A, Page, 999));

        Assert.Equal(Errno.Unspecified, dontneed);
        Assert.Equal([0x00, 0x11], zeroAgain.Values.ToByteArray());
        Assert.Equal(Errno.Unspecified, remap);
        Assert.Equal(0x11, moved.Values[0]);
        Assert.Equal(Errno.Unspecified, unmap);
        Assert.Equal(SignalCode.SegvMaperr, gone.Signal);
        Assert.Equal(Errno.Unspecified, clear);
        Assert.Equal(Errno.Einval, badClear);
        Assert.Equal(StatusCode.InvalidArgument, badAdvice.StatusCode);
    }

    [Fact]
    public async Task Fork_returns_the_child_which_copies_on_write()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1);
        await c.WriteAsync(s.Thread, A, 0x11);

        var fork = await c.ForkAsync(s.Mm, s.Thread);
        var shared = (await c.PagemapAsync(s.Mm, A, 1))[0].Pfn == (await c.PagemapAsync(fork.ChildMmId, A, 1))[0].Pfn;
        await c.WriteAsync(fork.ChildThreadId, A, 0x22);
        var parent = await c.ReadAsync(s.Thread, A);
        var child = await c.ReadAsync(fork.ChildThreadId, A);
        var childThread = await c.GetThreadAsync(fork.ChildThreadId);

        Assert.Equal(Errno.Unspecified, fork.Errno);
        Assert.Equal(s.Thread, fork.ThreadId);
        Assert.True(shared);
        Assert.Equal(0x11, parent.Values[0]);
        Assert.Equal(0x22, child.Values[0]);
        Assert.Equal(fork.ChildMmId, childThread.MmId);
        Assert.Equal(fork.ChildTid, childThread.Tid);
        Assert.NotEqual((await c.PagemapAsync(s.Mm, A, 1))[0].Pfn, (await c.PagemapAsync(fork.ChildMmId, A, 1))[0].Pfn);
    }

    [Fact]
    public async Task A_memfd_mapped_twice_shows_one_page_through_both_mappings()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c);
        var f = await c.CreateFileAsync(s.Machine, "guest-ram", shmem: true, size: 2 * Page);

        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, A, 2 * Page, 3, shared: true, fileId: f.FileId));
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(s.Mm, B, 2 * Page, 3, shared: true, fileId: f.FileId));
        await c.WriteAsync(s.Thread, A + Page, 0x5a);
        var viaB = await c.ReadAsync(s.Thread, B + Page);
        var vmas = await c.ListVmasAsync(s.Mm);
        var pa = (await c.PagemapAsync(s.Mm, A + Page, 1))[0];
        var pb = (await c.PagemapAsync(s.Mm, B + Page, 1))[0];

        Assert.True(f.Shmem);
        Assert.Equal(0x5a, viaB.Values[0]);
        Assert.All(vmas, v => Assert.Equal(f.FileId, v.FileId));
        Assert.Equal(pa.Pfn, pb.Pfn);
        Assert.True(pa.File);
    }

    [Fact]
    public async Task Page_table_dump_pagemap_kpageflags_and_smaps_show_the_uffd_wp_bit()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 2, registerMode: 2);
        await c.WriteAsync(s.Thread, A, 0x11);
        await c.ReadAsync(s.Thread, A + Page);

        var before = await c.DumpPageTableAsync(s.Mm, A, 2 * Page);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 1));
        var after = await c.DumpPageTableAsync(s.Mm, A, 2 * Page);
        var pm = await c.PagemapAsync(s.Mm, A, 2);
        var kf = await c.KpageflagsAsync(s.Machine, pm.Select(p => p.Pfn));
        var smaps = await c.SmapsAsync(s.Mm, A, A + (2 * Page));
        var vma = (await c.ListVmasAsync(s.Mm)).Single();

        Assert.Equal(2, before.Count);
        Assert.True(before[0] is { Present: true, Write: true, Dirty: true, UffdWp: false, Pmd: false });
        Assert.True(after[0] is { Present: true, Write: false, UffdWp: true });
        Assert.Equal(1UL << 10, after[0].Raw & (1UL << 10));
        Assert.Equal(before[0].Pfn, after[0].Pfn);
        Assert.True(pm[0] is { Present: true, UffdWp: true, Exclusive: true });
        Assert.Equal(1UL << 57, pm[0].Raw & (1UL << 57));
        Assert.Equal([false, true], kf.ZeroPage);
        Assert.Equal([false, false], kf.Thp);
        Assert.Equal(1, smaps.Single().RssPages);
        Assert.Contains("uffd_wp", vma.Flags);
        Assert.Equal(s.Uffd, vma.UffdId);
    }

    [Fact]
    public async Task Pagemap_scan_finds_written_pages_and_failures_carry_walk_end()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 4);
        await c.WriteAsync(s.Thread, A + Page, 0x11, count: 2);
        const ulong present = 1 << 3;

        var r = await OkAsync(c.Mm.PagemapScanAsync(new PagemapScanRequest { MmId = s.Mm, Start = A, End = A + (4 * Page), VecLen = 8, CategoryMask = present, ReturnMask = present }));
        var bad = await OkAsync(c.Mm.PagemapScanAsync(new PagemapScanRequest { MmId = s.Mm, Flags = 0x100, Start = A, End = A + (4 * Page), VecLen = 8 }));

        Assert.Equal((Errno.Unspecified, 1L), (r.Errno, r.Count));
        var region = Assert.Single(r.Regions);
        Assert.Equal((A + Page, A + (3 * Page), present), (region.Start, region.End, region.Categories));
        Assert.Equal(A + (4 * Page), r.WalkEnd);
        // A rejected argument: the ioctl fails before the walk, so no region and no walk_end.
        Assert.Equal((Errno.Einval, 0L, 0UL), (bad.Errno, bad.Count, bad.WalkEnd));
        Assert.Empty(bad.Regions);
    }

    [Fact]
    public async Task Lists_paginate_in_id_order_and_a_bad_page_token_is_rejected()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c);
        var extra = new List<long> { s.Thread };
        for (var i = 0; i < 4; i++)
            extra.Add((await s.NewThreadAsync()).ThreadId);

        var first = await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm, PageSize = 2 });
        var second = await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm, PageSize = 2, PageToken = first.NextPageToken });
        var last = await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm, PageSize = 2, PageToken = second.NextPageToken });
        var badToken = await Assert.ThrowsAsync<RpcException>(() => c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = s.Mm, PageToken = "nope" }).ResponseAsync);
        var badSize = await Assert.ThrowsAsync<RpcException>(() => c.Machines.ListMachinesAsync(new ListMachinesRequest { PageSize = 1001 }).ResponseAsync);

        Assert.Equal(extra.Order(), first.Threads.Concat(second.Threads).Concat(last.Threads).Select(t => t.ThreadId));
        Assert.Equal((2, 2, 1), (first.Threads.Count, second.Threads.Count, last.Threads.Count));
        Assert.NotEmpty(first.NextPageToken);
        Assert.Empty(last.NextPageToken);
        Assert.Equal((StatusCode.InvalidArgument, "page_token"), (badToken.StatusCode, BadFieldOf(badToken)));
        Assert.Equal((StatusCode.InvalidArgument, "page_size"), (badSize.StatusCode, BadFieldOf(badSize)));
    }
}
