using Google.Protobuf;

namespace UffdGrpc.ContractTests;

/// <summary>The batched Serve stream, byte-range accesses, process_vm_readv/writev and digests.</summary>
public sealed class ServeAndContentsTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Fact]
    public async Task ServeResolvesABatchInOrderWithInBandResults()
    {
        var c = fx.NewClient();
        const int n = 64;
        await using var s = await Sandbox.CreateAsync(c, pages: n, registerMode: 2);
        var threads = new List<long>();
        for (var i = 0; i < n; i++)
        {
            threads.Add((await s.NewThreadAsync()).ThreadId);
            Assert.True((await c.WriteAsync(threads[i], A + ((ulong)i * Page), 0x11)).Errno.IsOk());
        }
        Assert.True((await c.WriteprotectAsync(s.Uffd, A, n * Page, 1)).IsOk());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await using var serve = await c.ServeAsync(s.Uffd, maxMessages: n, ct: cts.Token);
        var writes = threads.Select((t, i) => c.WriteAsync(t, A + ((ulong)i * Page), 0x22, ct: cts.Token)).ToList();
        var faults = new List<UffdMsg>();
        while (faults.Count < n)
            faults.AddRange(await serve.Messages.ReadAsync(cts.Token));
        Assert.All(faults, m => Assert.True(m.Pagefault.Wp));
        Assert.Equal(n, faults.Select(m => m.Pagefault.Address).Distinct().Count());
        // One request: every un-protect, then a ZEROPAGE onto a present page (EEXIST in-band).
        var batch = faults.Select((m, i) => ServeSession.Unprotect(m.Pagefault.Address & ~(Page - 1), tag: (ulong)i)).ToList();
        batch.Add(ServeSession.Zeropage(A, tag: 999));
        var results = await serve.ResolveAsync(batch, cts.Token);
        Assert.Equal(n + 1, results.Count);
        Assert.Equal(Enumerable.Range(0, n).Select(i => (ulong)i).Append(999UL), results.Select(r => r.Tag));
        Assert.All(results.Take(n), r => Assert.Equal(Errno.Unspecified, r.Errno));
        Assert.Equal(Errno.Eexist, results[^1].Errno);
        Assert.Equal(-17, results[^1].Field);
        foreach (var w in writes)
            Assert.True((await w).Errno.IsOk());
    }

    [Fact]
    public async Task ServeRejectsAMalformedResolutionAndRunsNothingOfItsBatch()
    {
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 2, registerMode: 1);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await using var serve = await c.ServeAsync(s.Uffd, ct: cts.Token);
        var bad = new[]
        {
            ServeSession.Zeropage(A),
            new Resolution { UffdioCopy = new UffdioCopyRequest { Dst = A + Page, Len = Page, Fill = 300 } },
        };
        var ex = await Assert.ThrowsAsync<RpcException>(() => serve.ResolveAsync(bad, cts.Token));
        Assert.Equal(StatusCode.InvalidArgument, ex.StatusCode);
        // Nothing ran: page 0 is still empty.
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
    }

    [Fact]
    public async Task AOneMebibyteWriteAcrossRegisteredAndUnregisteredPagesEndsByteIdenticalToItsSource()
    {
        var c = fx.NewClient();
        const ulong pages = 257;
        const ulong offset = 2048;
        var machine = (await c.CreateMachineAsync()).MachineId;
        try
        {
            var src = await c.CreateMmAsync(machine);
            var dst = await c.CreateMmAsync(machine);
            var handler = await c.CreateMmAsync(machine);
            var srcThread = (await c.CreateThreadAsync(src)).ThreadId;
            var dstThread = (await c.CreateThreadAsync(dst)).ThreadId;
            var handlerThread = (await c.CreateThreadAsync(handler)).ThreadId;
            foreach (var mm in new[] { src, dst })
                Assert.True((await c.MmapAsync(mm, A, pages * Page, 3)).IsOk());
            Assert.True((await c.MmapAsync(handler, B, Page, 3)).IsOk());

            // The source: a background pattern, then the workload's 1 MiB at an unaligned offset.
            var background = new byte[pages * Page];
            new Random(7).NextBytes(background);
            Assert.Equal(background.Length, (int)(await c.WriteBytesAsync(srcThread, A, background)).DoneBytes);
            var buffer = new byte[1 << 20];
            new Random(8).NextBytes(buffer);
            Assert.Equal(buffer.Length, (int)(await c.WriteBytesAsync(srcThread, A + offset, buffer)).DoneBytes);

            // The destination: pages [0, 64) and [128, 257) MISSING-registered, [64, 128) not.
            var (e, uffd) = await c.CreateUffdAsync(dst);
            Assert.True(e.IsOk());
            Assert.True((await c.ApiAsync(uffd)).Errno.IsOk());
            Assert.True((await c.RegisterAsync(uffd, A, 64 * Page, 1)).Errno.IsOk());
            Assert.True((await c.RegisterAsync(uffd, A + (128 * Page), (pages - 128) * Page, 1)).Errno.IsOk());

            // The handler fetches each missing page from the source with process_vm_readv into
            // its own buffer, reads it out, and places it with UFFDIO_COPY through Serve.
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            await using var serve = await c.ServeAsync(uffd, ct: cts.Token);
            var served = 0;
            var handling = Task.Run(async () =>
            {
                await foreach (var msgs in serve.Messages.ReadAllAsync(cts.Token))
                {
                    var batch = new List<Resolution>();
                    foreach (var m in msgs)
                    {
                        var page = m.Pagefault.Address & ~(Page - 1);
                        var rv = await c.ProcessVmReadvAsync(handler, src, [new Iovec { Base = B, Len = Page }], [new Iovec { Base = page, Len = Page }], handlerThread, cts.Token);
                        Assert.Equal(Errno.Unspecified, rv.Errno);
                        Assert.Equal((long)Page, rv.Transferred);
                        var bytes = (await c.ReadBytesAsync(handlerThread, B, Page, ct: cts.Token)).Values;
                        batch.Add(ServeSession.Copy(page, bytes.Span));
                    }
                    // Counted before the COPY wakes the writer, which the test then checks.
                    Interlocked.Add(ref served, batch.Count);
                    foreach (var r in await serve.ResolveAsync(batch, cts.Token))
                        Assert.Equal(Errno.Unspecified, r.Errno);
                }
            }, cts.Token);

            var w = await c.WriteBytesAsync(dstThread, A + offset, buffer, ct: cts.Token);
            Assert.Equal(Errno.Unspecified, w.Errno);
            Assert.Equal((ulong)buffer.Length, w.DoneBytes);
            // Every registered page was fetched exactly once (the write faulted each one).
            Assert.Equal(64 + (int)(pages - 128), served);

            // Digests of both address spaces agree page by page.
            var ds = await c.DigestAsync(src, A, (uint)pages);
            var dd = await c.DigestAsync(dst, A, (uint)pages);
            for (var i = 0; i < (int)pages; i++)
            {
                Assert.Equal(PageState.Present, dd[i].State);
                Assert.Equal(ds[i].Sha256, dd[i].Sha256);
            }
            // And process_vm_readv of the whole range from each, read out, gives the same bytes.
            Assert.True((await c.MunmapAsync(handler, B, Page)).IsOk());
            Assert.True((await c.MmapAsync(handler, B, pages * Page, 3)).IsOk());
            foreach (var mm in new[] { src, dst })
            {
                var rv = await c.ProcessVmReadvAsync(handler, mm, [new Iovec { Base = B, Len = pages * Page }], [new Iovec { Base = A, Len = pages * Page }], handlerThread);
                Assert.Equal((long)(pages * Page), rv.Transferred);
                var got = (await c.ReadBytesAsync(handlerThread, B, pages * Page)).Values.ToByteArray();
                var expected = (byte[])background.Clone();
                buffer.CopyTo(expected, (int)offset);
                Assert.Equal(expected, got);
            }
            await serve.DisposeAsync();
            await cts.CancelAsync();
            await Assert.ThrowsAnyAsync<Exception>(() => handling);
        }
        finally
        {
            await c.DestroyMachineAsync(machine);
        }
    }

    [Fact]
    public async Task ASpanWriteReturnsTheBytesWrittenAndStopsAtTheFirstBadPage()
    {
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 2);
        var data = ByteString.CopyFrom(Enumerable.Range(0, 3 * (int)Page).Select(i => (byte)i).ToArray());
        var r = await c.WriteBytesAsync(s.Thread, A + 100, data.Memory);
        Assert.Equal(SignalCode.SegvMaperr, r.Signal);
        Assert.Equal((2 * Page) - 100, r.DoneBytes);
        var back = await c.ReadBytesAsync(s.Thread, A + 100, (2 * Page) - 100);
        Assert.Equal(data.Span[..(int)((2 * Page) - 100)].ToArray(), back.Values.ToByteArray());
    }
}
