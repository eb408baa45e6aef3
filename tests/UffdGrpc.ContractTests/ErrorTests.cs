using Google.Rpc;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.ContractTests;

/// <summary>The errno → status table, the status details, and requests the server rejects without changing anything.</summary>
public class ErrorTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Theory]
    [InlineData(Model.Errno.EINVAL, StatusCode.InvalidArgument)]
    [InlineData(Model.Errno.EEXIST, StatusCode.AlreadyExists)]
    [InlineData(Model.Errno.ENOENT, StatusCode.NotFound)]
    [InlineData(Model.Errno.ESRCH, StatusCode.NotFound)]
    [InlineData(Model.Errno.EBADF, StatusCode.NotFound)]
    [InlineData(Model.Errno.EAGAIN, StatusCode.Aborted)]
    [InlineData(Model.Errno.EPERM, StatusCode.PermissionDenied)]
    [InlineData(Model.Errno.EACCES, StatusCode.PermissionDenied)]
    [InlineData(Model.Errno.EBUSY, StatusCode.FailedPrecondition)]
    [InlineData(Model.Errno.EFAULT, StatusCode.OutOfRange)]
    [InlineData(Model.Errno.ENOMEM, StatusCode.ResourceExhausted)]
    [InlineData(Model.Errno.EHWPOISON, StatusCode.DataLoss)]
    [InlineData(Model.Errno.OK, StatusCode.OK)]
    public void The_errno_table_is_settled(Model.Errno errno, StatusCode code) => Assert.Equal(code, ErrnoStatus.CodeOf(errno));

    [Fact]
    public async Task A_failed_ioctl_carries_ErrorInfo_and_its_partial_result_so_a_copy_can_resume()
    {
        // Arrange: page 1 of 3 already exists, so a 3-page copy stops after page 0.
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 3, registerMode: 1);
        Assert.Equal(Errno.OK, (await c.ZeropageAsync(s.Uffd, A + Page, Page)).Errno);
        var data = Enumerable.Repeat((byte)0x44, (int)(3 * Page)).ToArray();

        // Act
        var call = c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = s.Uffd, Dst = A, Src = 0x7f00_0000_0000, Len = 3 * Page, Data = Google.Protobuf.ByteString.CopyFrom(data) });
        var ex = await Assert.ThrowsAsync<RpcException>(() => call.ResponseAsync);
        var status = ex.GetRpcStatus()!;
        var info = status.GetDetail<ErrorInfo>()!;
        var partial = status.GetDetail<UffdioCopyResponse>()!;
        // Resume as a handler would: skip what was copied, then the page that exists.
        var done = (ulong)partial.Copy!.Value;
        var second = await c.CopyAsync(s.Uffd, A + done, data.AsMemory((int)done, (int)Page));
        var third = await c.CopyAsync(s.Uffd, A + done + Page, data.AsMemory((int)(done + Page), (int)Page));

        // Assert
        Assert.Equal(StatusCode.Aborted, ex.StatusCode);
        Assert.Equal(("EAGAIN", "uffd.linux", "11"), (info.Reason, info.Domain, info.Metadata["errno"]));
        Assert.Equal(4096, partial.Copy);
        Assert.Equal(new FillOutcome(Errno.EEXIST, -17), second);
        Assert.Equal(new FillOutcome(Errno.OK, 4096), third);
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
        var badByte = await Assert.ThrowsAsync<RpcException>(() => c.AccessAsync(s.Thread, new AccessOp { Addr = A, Write = true, Value = 300 }));
        var noOp = await Assert.ThrowsAsync<RpcException>(() => c.StartOpAsync(s.Thread, new ThreadOp()));
        var badProt = await Assert.ThrowsAsync<RpcException>(() => c.MmapAsync(s.Mm, B, Page, 8));

        Assert.Equal(StatusCode.NotFound, unknown.StatusCode);
        Assert.Equal(("UNKNOWN_ID", "uffd.grpc", "mm_id"), (UffdErrors.ErrorInfoOf(unknown)!.Reason, UffdErrors.ErrorInfoOf(unknown)!.Domain, UffdErrors.ErrorInfoOf(unknown)!.Metadata["field"]));
        Assert.Equal(StatusCode.InvalidArgument, missing.StatusCode);
        Assert.Equal("mm_id", missing.GetRpcStatus()!.GetDetail<BadRequest>()!.FieldViolations[0].Field);
        Assert.Equal(StatusCode.NotFound, wrongKind.StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, badByte.StatusCode);
        Assert.Equal("access.value", badByte.GetRpcStatus()!.GetDetail<BadRequest>()!.FieldViolations[0].Field);
        Assert.Equal(StatusCode.InvalidArgument, noOp.StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, badProt.StatusCode);
        Assert.False(UffdErrors.TryGetErrno(badProt, out _));
        // Nothing changed: still one VMA, and the thread is idle.
        Assert.Single(await c.ListVmasAsync(s.Mm));
        Assert.Equal(ThreadState.Idle, (await c.GetThreadAsync(s.Thread)).State);
    }

    [Fact]
    public async Task Oversized_copy_payloads_are_rejected_and_change_nothing()
    {
        var c = fx.NewClient();
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);

        var tooBigForTheApi = await Assert.ThrowsAsync<RpcException>(() => c.CopyAsync(s.Uffd, A, new byte[(64 << 20) + 1]));
        var tooBigForTheWire = await Assert.ThrowsAsync<RpcException>(() => c.CopyAsync(s.Uffd, A, new byte[65 << 20]));

        Assert.Equal(StatusCode.InvalidArgument, tooBigForTheApi.StatusCode);
        Assert.Equal("data", tooBigForTheApi.GetRpcStatus()!.GetDetail<BadRequest>()!.FieldViolations[0].Field);
        Assert.Equal(StatusCode.ResourceExhausted, tooBigForTheWire.StatusCode);
        Assert.False((await c.PagemapAsync(s.Mm, A, 1))[0].Present);
        Assert.Equal(new FillOutcome(Errno.OK, 4096), await c.CopyAsync(s.Uffd, A, new byte[Page]));
    }
}
