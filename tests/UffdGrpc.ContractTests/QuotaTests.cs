using Google.Rpc;

namespace UffdGrpc.ContractTests;

/// <summary>A server with tiny limits, so each one can be reached.</summary>
public sealed class SmallLimitsFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Limits:MachinesPerPrincipal"] = "2",
        ["Limits:MmsPerMachine"] = "2",
        ["Limits:ThreadsPerMachine"] = "2",
        ["Limits:UffdsPerMachine"] = "1",
        ["Limits:FilesPerMachine"] = "1",
        ["Limits:StreamsPerPrincipal"] = "1",
        ["Limits:CompletionLogPerMachine"] = "1",
    };
}

/// <summary>Every limit of <c>Limits:*</c>: RESOURCE_EXHAUSTED naming it in a QuotaFailure, and nothing changes.</summary>
public sealed class QuotaTests(SmallLimitsFixture fx) : IClassFixture<SmallLimitsFixture>
{
    private static async Task<string> QuotaOf(Func<Task> call)
    {
        var ex = await Assert.ThrowsAsync<RpcException>(call);
        Assert.Equal(StatusCode.ResourceExhausted, ex.StatusCode);
        var status = ex.GetRpcStatus();
        Assert.NotNull(status);
        var failure = status.GetDetail<QuotaFailure>();
        Assert.NotNull(failure);
        return Assert.Single(failure.Violations).Description;
    }

    [Fact]
    public async Task Each_per_machine_limit_is_refused_with_its_name_and_changes_nothing()
    {
        var c = fx.NewClient();
        var m = (await c.CreateMachineAsync()).MachineId;
        try
        {
            var mm = await c.CreateMmAsync(m);
            await c.CreateMmAsync(m);
            Assert.StartsWith("MmsPerMachine = 2", await QuotaOf(() => c.CreateMmAsync(m)), StringComparison.Ordinal);
            Assert.Equal(2, (await c.GetMachineAsync(m)).MmIds.Count);

            var t = (await c.CreateThreadAsync(mm)).ThreadId;
            await c.CreateThreadAsync(mm);
            Assert.StartsWith("ThreadsPerMachine = 2", await QuotaOf(() => c.CreateThreadAsync(mm)), StringComparison.Ordinal);
            Assert.StartsWith("ThreadsPerMachine = 2", await QuotaOf(() => c.MunmapAsync(mm, A, Page)), StringComparison.Ordinal);
            Assert.Equal(2, (await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = mm })).Threads.Count);

            var (e, u) = await c.CreateUffdAsync(mm);
            Assert.True(e.IsOk());
            Assert.StartsWith("UffdsPerMachine = 1", await QuotaOf(() => c.CreateUffdAsync(mm)), StringComparison.Ordinal);
            Assert.True((await c.CloseUffdAsync(u)).IsOk());
            Assert.True((await c.CreateUffdAsync(mm)).Errno.IsOk());

            await c.CreateFileAsync(m, "a", shmem: true, Page);
            Assert.StartsWith("FilesPerMachine = 1", await QuotaOf(() => c.CreateFileAsync(m, "b", shmem: true, Page)), StringComparison.Ordinal);

            Assert.True((await c.MmapAsync(mm, A, Page, 3)).IsOk());
            var op = new ThreadOp { Access = UffdClient.Touch(A, write: false) };
            await c.StartOpAsync(t, op);
            Assert.StartsWith("CompletionLogPerMachine = 1", await QuotaOf(() => c.StartOpAsync(t, op)), StringComparison.Ordinal);
            Assert.Single(await c.TakeCompletionsAsync(m));
            await c.StartOpAsync(t, op);
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
    }

    [Fact]
    public async Task Machines_and_streams_are_limited_per_principal()
    {
        var c = fx.NewClient();
        var m1 = (await c.CreateMachineAsync()).MachineId;
        var m2 = (await c.CreateMachineAsync()).MachineId;
        try
        {
            Assert.StartsWith("MachinesPerPrincipal = 2", await QuotaOf(() => c.CreateMachineAsync()), StringComparison.Ordinal);
            var mm = await c.CreateMmAsync(m1);
            var (_, u) = await c.CreateUffdAsync(mm);
            Assert.True((await c.ApiAsync(u)).Errno.IsOk());
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            using var first = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = u }, cancellationToken: cts.Token);
            await EventuallyAsync(async () => (await c.PollAsync(u)).Readers == 1, "the first stream is open");
            using var second = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = u }, cancellationToken: cts.Token);
            Assert.StartsWith("StreamsPerPrincipal = 1", await QuotaOf(() => second.ResponseStream.MoveNext(cts.Token)), StringComparison.Ordinal);
            Assert.Equal(1u, (await c.PollAsync(u)).Readers);
        }
        finally
        {
            await c.DestroyMachineAsync(m1);
            await c.DestroyMachineAsync(m2);
        }
    }
}
