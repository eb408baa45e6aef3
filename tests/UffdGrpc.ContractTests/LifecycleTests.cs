using Microsoft.Extensions.DependencyInjection;
using UffdGrpc.Server.Hosting;

namespace UffdGrpc.ContractTests;

/// <summary>Graceful shutdown, and a model error that must not leave a machine's lock held or a thread stuck.</summary>
public sealed class LifecycleTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    [Fact]
    public async Task SigtermEndsStreamsAndPendingAccessesWithUnavailableAndExitsWithinFiveSeconds()
    {
        await using var server = await ServerProcess.StartAsync();
        using var c = new UffdClient(server.Address);
        // Not disposed: the server it lives on is stopped by the test.
        var s = await Sandbox.CreateAsync(c, pages: 1, registerMode: 1);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var stream = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd }, cancellationToken: cts.Token);
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "the stream is open");
        // A thread asleep in a MISSING fault whose message the stream has read.
        var access = c.ReadAsync(s.Thread, A, ct: cts.Token);
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        await EventuallyAsync(async () => (await c.GetThreadAsync(s.Thread)).State == ThreadState.BlockedInUserfault, "the reader blocks");
        var took = await server.TerminateAsync(TimeSpan.FromSeconds(10));
        Assert.True(took < TimeSpan.FromSeconds(5), $"the server took {took.TotalSeconds:F1} s to exit");
        var ex = await Assert.ThrowsAsync<RpcException>(() => access);
        Assert.Equal(StatusCode.Unavailable, ex.StatusCode);
        var sx = await Assert.ThrowsAsync<RpcException>(() => stream.ResponseStream.MoveNext(cts.Token));
        Assert.Equal(StatusCode.Unavailable, sx.StatusCode);
    }

    [Fact]
    public async Task AModelExceptionBreaksOnlyItsMachineAndFailsItsWaiters()
    {
        var c = fx.NewClient();
        var registry = fx.Services.GetRequiredService<MachineRegistry>();
        await using var s = await Sandbox.CreateAsync(c, pages: 1, registerMode: 1);
        await using var other = await Sandbox.CreateAsync(c, pages: 1);
        var access = c.ReadAsync(s.Thread, A);
        await EventuallyAsync(async () => (await c.GetThreadAsync(s.Thread)).State == ThreadState.BlockedInUserfault, "the reader blocks");
        var host = registry.Machine(s.Machine);
        var boom = Assert.Throws<RpcException>(() => host.Run(() => throw new InvalidOperationException("injected model bug")));
        Assert.Equal(StatusCode.Internal, boom.StatusCode);
        // The lock was released (this returns), the waiter failed, every later call says why.
        var waiter = await Assert.ThrowsAsync<RpcException>(() => access);
        Assert.Equal(StatusCode.FailedPrecondition, waiter.StatusCode);
        var later = await Assert.ThrowsAsync<RpcException>(() => c.PollAsync(s.Uffd));
        Assert.Equal(StatusCode.FailedPrecondition, later.StatusCode);
        Assert.Contains("injected model bug", (await c.GetMachineAsync(s.Machine)).Broken, StringComparison.Ordinal);
        // Another machine is untouched.
        Assert.True((await c.WriteAsync(other.Thread, A, 0x33)).Errno.IsOk());
    }

    [Fact]
    public async Task A_populate_of_a_large_vma_yields_the_machine_to_other_clients_between_chunks()
    {
        var c = fx.NewClient();
        var other = fx.NewClient();
        const ulong len = 1UL << 30;
        await using var s = await Sandbox.CreateAsync(c);
        Assert.True((await c.MmapAsync(s.Mm, A, len, 3)).IsOk());
        // The other client's channel is open and its calls' paths warm before the populate
        // starts: under a loaded suite its first call (connection set-up, JIT) could otherwise
        // arrive after the whole populate.
        Assert.Equal(ThreadState.Idle, (await other.GetThreadAsync(s.Thread)).State);
        Assert.Single(await other.PagemapAsync(s.Mm, A + len - Page, 1));
        var start = await c.StartOpAsync(s.Thread, new ThreadOp { Populate = new PopulateOp { Start = A, Len = len, Write = true } });
        var worst = TimeSpan.Zero;
        var sawRunning = 0;
        var calls = 0;
        while ((await other.GetThreadAsync(s.Thread)).State == ThreadState.Running)
        {
            sawRunning++;
            var sw = System.Diagnostics.Stopwatch.StartNew();
            var pm = await other.PagemapAsync(s.Mm, A + len - Page, 1);
            sw.Stop();
            calls++;
            if (sw.Elapsed > worst)
                worst = sw.Elapsed;
            Assert.Single(pm);
        }
        var done = await c.WaitOpAsync(start.OpId);
        Assert.True(done.Errno.IsOk());
        Assert.True(sawRunning > 0, "the populate finished before another call could observe it");
        // One chunk is Kernel.ReschedPages (4,096) pages: a few ms of work between the calls.
        Assert.True(worst < TimeSpan.FromMilliseconds(250), $"a call on the machine waited {worst.TotalMilliseconds:F0} ms during the populate ({calls} calls)");
        // Every page was populated (plus its page tables: 512 PTE tables and the upper levels).
        Assert.InRange((await c.GetMachineAsync(s.Machine)).UsedPages, (long)(len / Page), (long)(len / Page) + 1024);
    }
}
