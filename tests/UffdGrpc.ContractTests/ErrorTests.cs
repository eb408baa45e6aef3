using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.ContractTests;

/// <summary>The wire errno, partial results in-band, and requests the server rejects (with a status) without changing anything.</summary>
public class ErrorTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Fact]
    public void Every_model_errno_crosses_the_wire_with_its_x86_64_number_and_name()
    {
        foreach (var m in Enum.GetValues<Model.Errno>())
        {
            var wire = ProtoMapping.ToProto(m);

            Assert.True(Enum.IsDefined(wire), $"the wire enum has no value for {m}");
            Assert.Equal((int)m, (int)wire);
            Assert.Equal(Model.ErrnoExtensions.Name(m).ToUpperInvariant(), wire.Name().ToUpperInvariant());
        }
        Assert.Equal(("ok", true), (Errno.Unspecified.Name(), Errno.Unspecified.IsOk()));
        Assert.Equal(("EEXIST", 17, false), (Errno.Eexist.Name(), (int)Errno.Eexist, Errno.Eexist.IsOk()));
        Assert.Equal("E#200", ((Errno)200).Name());
        var thrown = Assert.Throws<UffdErrnoException>(() => Errno.Eagain.Expect("UFFDIO_COPY"));
        Assert.Equal(Errno.Eagain, thrown.Errno);
        Errno.Unspecified.Expect("UFFDIO_COPY");
    }

    [Fact]
    public async Task A_failed_ioctl_answers_OK_with_its_errno_and_partial_result_so_a_copy_can_resume()
    {
        // Arrange: page 1 of 3 already exists, so a 3-page copy stops after page 0.
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 3, registerMode: 1);
        Assert.Equal(Errno.Unspecified, (await c.ZeropageAsync(s.Uffd, A + Page, Page)).Errno);
        var data = Enumerable.Repeat((byte)0x44, (int)(3 * Page)).ToArray();

        // Act
        var partial = await OkAsync(c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = s.Uffd, Dst = A, Src = 0x7f00_0000_0000, Len = 3 * Page, Data = Google.Protobuf.ByteString.CopyFrom(data) }));
        // Resume as a handler would: skip what was copied, then the page that exists.
        var done = (ulong)partial.Copy!.Value;
        var second = await c.CopyAsync(s.Uffd, A + done, data.AsMemory((int)done, (int)Page));
        var third = await c.CopyAsync(s.Uffd, A + done + Page, data.AsMemory((int)(done + Page), (int)Page));

        // Assert
        Assert.Equal(Errno.Eagain, partial.Errno);
        Assert.Equal(4096, partial.Copy);
        Assert.Equal(new FillOutcome(Errno.Eexist, -17), second);
        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), third);
        Assert.Equal([0x44, 0x00, 0x44], (await c.ReadAsync(s.Thread, A, count: 3)).Values.ToByteArray());
    }

    [Fact]
    public async Task Unknown_and_missing_ids_are_rejected_with_a_clear_status()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1);

        var unknown = await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(999_999_999, A, Page, 3));
        var missing = await Assert.ThrowsAsync<RpcException>(() => c.CreateThreadAsync(0));
        var wrongKind = await Assert.ThrowsAsync<RpcException>(() => c.WriteprotectAsync(s.Mm, A, Page, 1));
        var badByte = await Assert.ThrowsAsync<RpcException>(() => c.AccessAsync(s.Thread, new AccessOp { Addr = A, Write = true, Touch = new TouchPattern { Value = 300 } }));
        var noForm = await Assert.ThrowsAsync<RpcException>(() => c.AccessAsync(s.Thread, new AccessOp { Addr = A, Write = true }));
        var noOp = await Assert.ThrowsAsync<RpcException>(() => c.StartOpAsync(s.Thread, new ThreadOp()));
        var badProt = await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(s.Mm, B, Page, 8));
        var unknownUffd = await Assert.ThrowsAsync<RpcException>(() => c.CopyFillAsync(987_654_321, A, 0x7f00_0000_0000, 1, Page));

        Assert.Equal(StatusCode.NotFound, unknown.StatusCode);
        Assert.Equal(("UNKNOWN_ID", "uffd.grpc", "mm_id"), (ErrorInfoOf(unknown)!.Reason, ErrorInfoOf(unknown)!.Domain, ErrorInfoOf(unknown)!.Metadata["field"]));
        Assert.Equal(StatusCode.InvalidArgument, missing.StatusCode);
        Assert.Equal("mm_id", BadFieldOf(missing));
        Assert.Equal(StatusCode.NotFound, wrongKind.StatusCode);
        Assert.Equal(("UNKNOWN_ID", "uffd_id"), (ErrorInfoOf(wrongKind)!.Reason, ErrorInfoOf(wrongKind)!.Metadata["field"]));
        Assert.Equal(StatusCode.InvalidArgument, badByte.StatusCode);
        Assert.Equal("access.touch.value", BadFieldOf(badByte));
        Assert.Equal(StatusCode.InvalidArgument, noForm.StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, noOp.StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, badProt.StatusCode);
        // A rejected request is the server's, never a kernel errno.
        Assert.Equal("uffd.grpc", ErrorInfoOf(badProt)!.Domain);
        Assert.Equal(StatusCode.NotFound, unknownUffd.StatusCode);
        // Nothing changed: still one VMA, no page, and the thread is idle with nothing completed.
        Assert.Single(await c.ListVmasAsync(s.Mm));
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
        var thread = await c.GetThreadAsync(s.Thread);
        Assert.Equal((ThreadState.Idle, 0L), (thread.State, thread.OpId));
        Assert.Empty(await c.TakeCompletionsAsync(s.Machine));
    }

    [Fact]
    public async Task Oversized_copy_payloads_are_rejected_and_change_nothing()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);

        var tooBigForTheApi = await Assert.ThrowsAsync<RpcException>(() => c.CopyAsync(s.Uffd, A, new byte[(64 << 20) + 1]));
        var tooBigForTheWire = await Assert.ThrowsAsync<RpcException>(() => c.CopyAsync(s.Uffd, A, new byte[65 << 20]));

        Assert.Equal(StatusCode.InvalidArgument, tooBigForTheApi.StatusCode);
        Assert.Equal("data", BadFieldOf(tooBigForTheApi));
        Assert.Equal(StatusCode.ResourceExhausted, tooBigForTheWire.StatusCode);
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
        Assert.Equal(new FillOutcome(Errno.Unspecified, 4096), await c.CopyAsync(s.Uffd, A, new byte[Page]));
    }

    [Fact]
    public async Task A_copy_without_a_usable_source_is_rejected_naming_the_field_and_changes_nothing()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);

        var noSource = await Assert.ThrowsAsync<RpcException>(() => c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = s.Uffd, Dst = A, Src = 0x7f00_0000_0000, Len = Page }).ResponseAsync);
        var badFill = await Assert.ThrowsAsync<RpcException>(() => c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = s.Uffd, Dst = A, Src = 0x7f00_0000_0000, Len = Page, Fill = 300 }).ResponseAsync);

        Assert.Equal((StatusCode.InvalidArgument, "source"), (noSource.StatusCode, BadFieldOf(noSource)));
        Assert.Equal((StatusCode.InvalidArgument, "fill"), (badFill.StatusCode, BadFieldOf(badFill)));
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
        Assert.Equal(0u, (await c.PollAsync(s.Uffd)).Unread);
    }
}
