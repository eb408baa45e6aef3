namespace UffdGrpc.ContractTests;

/// <summary>An address space exported to a file and imported into another machine: contents, VMAs, registrations and uffd-wp bits come back.</summary>
public sealed class ImageTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    private const ulong F = 0x7e00_0080_0000;
    private const ulong P = 0x7e00_00c0_0000;

    [Fact]
    public async Task An_exported_address_space_imports_with_the_same_contents_vmas_registrations_and_uffd_wp_bits()
    {
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 8, registerMode: 2, features: (1 << 13) | 1); // WP_UNPOPULATED | PAGEFAULT_FLAG_WP
        // Anon pages with data (some write-protected, one an unpopulated marker), a shared
        // memfd mapping, and a private read-only file mapping with a COW page.
        var data = new byte[6 * Page];
        new Random(3).NextBytes(data);
        Assert.Equal(data.Length, (int)(await c.WriteBytesAsync(s.Thread, A, data)).DoneBytes);
        Assert.True((await c.WriteprotectAsync(s.Uffd, A + Page, 2 * Page, 1)).IsOk());
        Assert.True((await c.WriteprotectAsync(s.Uffd, A + (7 * Page), Page, 1)).IsOk());
        var memfd = await c.CreateFileAsync(s.Machine, "memfd", shmem: true, 4 * Page);
        Assert.True((await c.MmapAsync(s.Mm, F, 4 * Page, 3, shared: true, fileId: memfd.FileId)).IsOk());
        Assert.True((await c.WriteAsync(s.Thread, F + Page, 0x5a)).Errno.IsOk());
        Assert.True((await c.MmapAsync(s.Mm, P, 2 * Page, 3, shared: false, fileId: memfd.FileId)).IsOk());
        Assert.True((await c.WriteAsync(s.Thread, P, 0x77)).Errno.IsOk());
        Assert.True((await c.MprotectAsync(s.Mm, P, 2 * Page, 1)).IsOk());

        var file = Path.Combine(Path.GetTempPath(), $"mm-{Guid.NewGuid():N}.img");
        try
        {
            await File.WriteAllBytesAsync(file, await c.ExportMmAsync(s.Mm));
            var other = (await c.CreateMachineAsync()).MachineId;
            try
            {
                var imported = await c.ImportMmAsync(other, await File.ReadAllBytesAsync(file));
                var mm = imported.Mm.MmId;
                var uffd = Assert.Single(imported.UffdIds);

                // The same VMAs, perms and uffd flags.
                var (va, vb) = (await c.ListVmasAsync(s.Mm), await c.ListVmasAsync(mm));
                Assert.Equal(va.Select(v => (v.Start, v.End, v.Perms, string.Join(",", v.Flags))), vb.Select(v => (v.Start, v.End, v.Perms, string.Join(",", v.Flags))));
                // The same contents, page by page, in every VMA.
                foreach (var (start, pages) in new[] { (A, 8u), (F, 4u), (P, 2u) })
                {
                    var (da, db) = (await c.DigestAsync(s.Mm, start, pages), await c.DigestAsync(mm, start, pages));
                    Assert.Equal(da.Select(d => d.Sha256), db.Select(d => d.Sha256));
                }
                // The same uffd-wp bits (PTE bits and the marker) in the WP range.
                var (pa, pb) = (await c.PagemapAsync(s.Mm, A, 8), await c.PagemapAsync(mm, A, 8));
                Assert.Equal(pa.Select(e => e.UffdWp), pb.Select(e => e.UffdWp));
                Assert.Equal([false, true, true, false, false, false, false, true], pb.Select(e => e.UffdWp));
                // And the registration works: a write to a protected page faults WP on the new uffd.
                var t = (await c.CreateThreadAsync(mm)).ThreadId;
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                var write = c.WriteAsync(t, A + Page, 0x01, ct: cts.Token);
                await foreach (var msg in c.ReadEventsAsync(uffd, cts.Token))
                {
                    Assert.True(msg.Pagefault.Wp);
                    Assert.True((await c.WriteprotectAsync(uffd, A + Page, Page, 0)).IsOk());
                    break;
                }
                Assert.True((await write).Errno.IsOk());
            }
            finally
            {
                await c.DestroyMachineAsync(other);
            }
        }
        finally
        {
            File.Delete(file);
        }
    }

    [Fact]
    public async Task A_malformed_image_is_refused_and_creates_nothing()
    {
        var c = fx.NewClient();
        var m = (await c.CreateMachineAsync()).MachineId;
        try
        {
            var ex = await Assert.ThrowsAsync<RpcException>(() => c.ImportMmAsync(m, new byte[] { 0xff, 0xff, 0xff }));
            Assert.Equal(StatusCode.InvalidArgument, ex.StatusCode);
            var bad = new MmImage { Version = 1, Vmas = { new VmaImage { Start = 1, End = Page } } };
            ex = await Assert.ThrowsAsync<RpcException>(() => c.ImportMmAsync(m, Google.Protobuf.MessageExtensions.ToByteArray(bad)));
            Assert.Equal(StatusCode.InvalidArgument, ex.StatusCode);
            Assert.Empty((await c.GetMachineAsync(m)).MmIds);
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
    }

    [Fact]
    public async Task A_graceful_shutdown_saves_every_machine_and_the_next_start_loads_them()
    {
        var dir = Path.Combine(Path.GetTempPath(), $"uffdgrpc-saved-{Guid.NewGuid():N}");
        var env = new Dictionary<string, string> { ["Persistence__Directory"] = dir };
        try
        {
            byte[] data = new byte[3 * Page];
            new Random(11).NextBytes(data);
            IReadOnlyList<PageDigest> before;
            await using (var first = await ServerProcess.StartAsync(env))
            {
                using var c = new UffdClient(first.Address);
                var s = await Sandbox.CreateAsync(c, pages: 3, registerMode: 2);
                Assert.True((await c.WriteBytesAsync(s.Thread, A, data)).Errno.IsOk());
                Assert.True((await c.WriteprotectAsync(s.Uffd, A + Page, Page, 1)).IsOk());
                before = await c.DigestAsync(s.Mm, A, 3);
                await first.TerminateAsync(TimeSpan.FromSeconds(10));
            }
            Assert.Single(Directory.GetFiles(dir, "machine-*.img"));
            await using var second = await ServerProcess.StartAsync(env);
            using var c2 = new UffdClient(second.Address);
            var machine = Assert.Single((await c2.Machines.ListMachinesAsync(new ListMachinesRequest())).Machines);
            var mm = Assert.Single(machine.MmIds);
            Assert.Equal(before.Select(d => d.Sha256), (await c2.DigestAsync(mm, A, 3)).Select(d => d.Sha256));
            Assert.Equal([false, true, false], (await c2.PagemapAsync(mm, A, 3)).Select(e => e.UffdWp));
        }
        finally
        {
            if (Directory.Exists(dir))
                Directory.Delete(dir, recursive: true);
        }
    }
}
