using Microsoft.Extensions.DependencyInjection;
using UffdGrpc.Server.Hosting;

namespace UffdGrpc.ContractTests;

/// <summary>A server that keeps answering for only the newest four retired ids of a machine.</summary>
public sealed class FewRetiredIdsFixture : GrpcTestFixture
{
    public const int Keep = 4;

    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Limits:RetiredIdsPerMachine"] = Keep.ToString(System.Globalization.CultureInfo.InvariantCulture),
    };
}

/// <summary>
/// Limits:RetiredIdsPerMachine: a machine that opens and closes uffds, or forks and reaps
/// processes, for ever holds its live objects plus a bounded number of retired ones; the
/// newest retired ids still get the kernel's answer for a stale object, older ones NOT_FOUND.
/// </summary>
public sealed class RetiredIdTests(FewRetiredIdsFixture fx) : IClassFixture<FewRetiredIdsFixture>
{
    private const int Keep = FewRetiredIdsFixture.Keep;

    [Fact]
    public async Task Closed_uffds_are_forgotten_oldest_first_and_their_contexts_freed()
    {
        var c = fx.NewClient();
        var m = (await c.CreateMachineAsync()).MachineId;
        try
        {
            var mm = await c.CreateMmAsync(m);
            var closed = new List<long>();
            for (var i = 0; i < 10 * Keep; i++)
            {
                var (e, u) = await c.CreateUffdAsync(mm);
                Assert.True(e.IsOk());
                Assert.True((await c.CloseUffdAsync(u)).IsOk());
                closed.Add(u);
            }
            var host = fx.Services.GetRequiredService<MachineRegistry>().Machine(m);
            // What the model and the registry hold is bounded by the limit, not by the churn.
            Assert.InRange(host.Kernel.Locked(() => host.Kernel.Contexts.Count), 1, 2 * Keep);
            // The newest closed uffd is still a stale fd: EBADF, in band.
            Assert.Equal(Errno.Ebadf, await c.CloseUffdAsync(closed[^1]));
            // The oldest is forgotten: an unknown id, as if it never existed.
            var ex = await Assert.ThrowsAsync<RpcException>(() => c.CloseUffdAsync(closed[0]));
            Assert.Equal(StatusCode.NotFound, ex.StatusCode);
            // A live uffd is never forgotten, however many retire after it.
            var (le, live) = await c.CreateUffdAsync(mm);
            Assert.True(le.IsOk());
            for (var i = 0; i < 4 * Keep; i++)
                Assert.True((await c.CloseUffdAsync((await c.CreateUffdAsync(mm)).UffdId)).IsOk());
            Assert.True((await c.ApiAsync(live)).Errno.IsOk());
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
        Assert.Empty(fx.Errors);
    }

    [Fact]
    public async Task Reaped_fork_children_and_their_threads_are_forgotten_oldest_first()
    {
        var c = fx.NewClient();
        var m = (await c.CreateMachineAsync()).MachineId;
        try
        {
            var mm = await c.CreateMmAsync(m);
            var t = (await c.CreateThreadAsync(mm)).ThreadId;
            var children = new List<(long Mm, long Thread)>();
            for (var i = 0; i < 10 * Keep; i++)
            {
                var f = await c.ForkAsync(mm, t);
                Assert.True(f.Errno.IsOk());
                await c.DestroyMmAsync(f.ChildMmId);
                children.Add((f.ChildMmId, f.ChildThreadId));
            }
            Assert.Contains(mm, (await c.GetMachineAsync(m)).MmIds);
            // The newest reaped child and its thread still answer as exited; the oldest are unknown.
            Assert.Equal(ThreadState.Exited, (await c.Threads.GetThreadAsync(new GetThreadRequest { ThreadId = children[^1].Thread })).Thread.State);
            var ex = await Assert.ThrowsAsync<RpcException>(async () => await c.Threads.GetThreadAsync(new GetThreadRequest { ThreadId = children[0].Thread }));
            Assert.Equal(StatusCode.NotFound, ex.StatusCode);
            ex = await Assert.ThrowsAsync<RpcException>(async () => await c.Mm.GetMmAsync(new GetMmRequest { MmId = children[0].Mm }));
            Assert.Equal(StatusCode.NotFound, ex.StatusCode);
            Assert.True((await c.Mm.GetMmAsync(new GetMmRequest { MmId = children[^1].Mm })).Mm.Exited);
            // The parent's thread lives on and still works.
            Assert.True((await c.ForkAsync(mm, t)).Errno.IsOk());
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
        Assert.Empty(fx.Errors);
    }
}
