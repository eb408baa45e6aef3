namespace UffdGrpc.ContractTests;

/// <summary>A server with two token principals and anonymous access denied.</summary>
public sealed class TokenServerFixture : GrpcTestFixture
{
    public const string Alice = "alice-token-0123456789";
    public const string Bob = "bob-token-0123456789ab";

    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Auth:Anonymous"] = "Deny",
        ["Auth:Tokens:alice"] = Alice,
        ["Auth:Tokens:bob"] = Bob,
    };
}

/// <summary>
/// Tenants: every machine and everything in it belongs to the principal that created it;
/// another principal learns nothing about it (NOT_FOUND, as for an id that never existed)
/// until the owner grants access.
/// </summary>
public sealed class SecurityTests(TokenServerFixture fx) : IClassFixture<TokenServerFixture>
{
    private UffdClient As(string token) => new(fx.CreateChannel(token));

    private static async Task<StatusCode> StatusOf(Func<Task> call)
    {
        var ex = await Assert.ThrowsAsync<RpcException>(call);
        return ex.StatusCode;
    }

    [Fact]
    public async Task Calls_without_a_valid_token_are_unauthenticated_but_health_is_open()
    {
        using var anonymous = new UffdClient(fx.CreateChannel());
        Assert.Equal(StatusCode.Unauthenticated, await StatusOf(() => anonymous.CreateMachineAsync()));
        using var wrong = new UffdClient(fx.CreateChannel("not-a-token-of-this-server"));
        Assert.Equal(StatusCode.Unauthenticated, await StatusOf(() => wrong.CreateMachineAsync()));
        // Every call shape, the client stream (ImportMm) included: an image sent without a
        // valid token lands in nobody's machine.
        using var alice = As(TokenServerFixture.Alice);
        await using var s = await Sandbox.CreateAsync(alice, pages: 1, registerMode: 2);
        var image = await alice.ExportMmAsync(s.Mm);
        var mms = (await alice.Mm.ListMmsAsync(new ListMmsRequest { MachineId = s.Machine })).Mms.Count;
        Assert.Equal(StatusCode.Unauthenticated, await StatusOf(() => anonymous.ImportMmAsync(s.Machine, image)));
        Assert.Equal(StatusCode.Unauthenticated, await StatusOf(() => wrong.ImportMmAsync(s.Machine, image)));
        Assert.Equal(mms, (await alice.Mm.ListMmsAsync(new ListMmsRequest { MachineId = s.Machine })).Mms.Count);
        var health = new Grpc.Health.V1.Health.HealthClient(fx.CreateChannel());
        Assert.Equal(Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus.Serving, (await health.CheckAsync(new Grpc.Health.V1.HealthCheckRequest())).Status);
    }

    [Fact]
    public async Task Another_principal_sees_nothing_of_a_machine_in_any_service()
    {
        using var alice = As(TokenServerFixture.Alice);
        using var bob = As(TokenServerFixture.Bob);
        await using var s = await Sandbox.CreateAsync(alice, pages: 1, registerMode: 2);
        Assert.Equal("alice", (await alice.GetMachineAsync(s.Machine)).Owner);
        var file = await alice.CreateFileAsync(s.Machine, "f", shmem: true, Page);

        Assert.DoesNotContain((await bob.Machines.ListMachinesAsync(new ListMachinesRequest())).Machines, m => m.MachineId == s.Machine);
        var calls = new Func<Task>[]
        {
            () => bob.GetMachineAsync(s.Machine),
            () => bob.DestroyMachineAsync(s.Machine),
            () => bob.Mm.ListMmsAsync(new ListMmsRequest { MachineId = s.Machine }).ResponseAsync,
            () => bob.CreateMmAsync(s.Machine),
            () => bob.MmapAsync(s.Mm, B, Page, 3),
            () => bob.DigestAsync(s.Mm, A, 1),
            () => bob.MmapAsync(s.Mm, B, Page, 3, shared: true, fileId: file.FileId),
            () => bob.WriteAsync(s.Thread, A, 0x66),
            () => bob.GetThreadAsync(s.Thread),
            () => bob.PollAsync(s.Uffd),
            () => bob.WriteprotectAsync(s.Uffd, A, Page, 0),
            async () =>
            {
                await foreach (var _ in bob.ReadEventsAsync(s.Uffd))
                {
                }
            },
        };
        foreach (var call in calls)
            Assert.Equal(StatusCode.NotFound, await StatusOf(call));
        // Alice's process is no pid Bob can name: process_vm_readv from his own process is ESRCH.
        var bm = (await bob.CreateMachineAsync()).MachineId;
        var bmm = await bob.CreateMmAsync(bm);
        Assert.True((await bob.MmapAsync(bmm, A, Page, 3)).IsOk());
        var rv = await bob.ProcessVmReadvAsync(bmm, s.Mm, [new Iovec { Base = A, Len = Page }], [new Iovec { Base = A, Len = Page }]);
        Assert.Equal(Errno.Esrch, rv.Errno);
        await bob.DestroyMachineAsync(bm);
        // Alice's machine is untouched.
        Assert.True((await alice.WriteAsync(s.Thread, A, 0x11)).Errno.IsOk());
        Assert.Single(await alice.ListVmasAsync(s.Mm));
    }

    [Fact]
    public async Task A_grant_lets_a_handler_service_serve_faults_but_not_destroy_and_a_revoke_ends_it()
    {
        using var alice = As(TokenServerFixture.Alice);
        using var bob = As(TokenServerFixture.Bob);
        await using var s = await Sandbox.CreateAsync(alice, pages: 1, registerMode: 1);
        var granted = await alice.Machines.GrantMachineAccessAsync(new GrantMachineAccessRequest { MachineId = s.Machine, Principal = "bob" });
        Assert.Equal(["bob"], granted.Machine.Grantees);

        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var handler = new FaultHandlerLoop(bob, s.Uffd);
        var serving = handler.RunAsync(cts.Token);
        var read = await alice.ReadAsync(s.Thread, A, ct: cts.Token);
        Assert.True(read.Errno.IsOk());
        await EventuallyAsync(() => Task.FromResult(handler.Handled == 1), "bob's handler counts the fault it served");

        Assert.Equal(StatusCode.PermissionDenied, await StatusOf(() => bob.DestroyMachineAsync(s.Machine)));
        Assert.Equal(StatusCode.PermissionDenied, await StatusOf(() => bob.Machines.GrantMachineAccessAsync(new GrantMachineAccessRequest { MachineId = s.Machine, Principal = "mallory" }).ResponseAsync));
        await alice.Machines.RevokeMachineAccessAsync(new RevokeMachineAccessRequest { MachineId = s.Machine, Principal = "bob" });
        Assert.Equal(StatusCode.NotFound, await StatusOf(() => bob.PollAsync(s.Uffd)));
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => serving);
    }

    [Fact]
    public async Task Ids_are_random_not_consecutive()
    {
        using var alice = As(TokenServerFixture.Alice);
        var ids = new List<long>();
        for (var i = 0; i < 8; i++)
            ids.Add((await alice.CreateMachineAsync()).MachineId);
        foreach (var id in ids)
            await alice.DestroyMachineAsync(id);
        // Consecutive creations land far apart (a 2^-30 chance per pair of failing by accident).
        Assert.All(ids.Zip(ids.Skip(1)), p => Assert.True(Math.Abs(p.First - p.Second) > (1L << 32), $"{p.First} and {p.Second} are close"));
        Assert.All(ids, id => Assert.True(id > 0));
    }
}
