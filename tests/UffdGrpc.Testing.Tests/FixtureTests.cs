using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;
using Xunit.Abstractions;

namespace UffdGrpc.Testing.Tests;

/// <summary>The same contract test, a uffd-wp fault resolved by a handler, through each fixture.</summary>
internal static class FaultRoundTrip
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Page = 4096;

    /// <summary>A write to a write-protected page sleeps until a handler un-protects it; the write then lands.</summary>
    public static async Task RunAsync(UffdClient c)
    {
        var machine = (await c.CreateMachineAsync()).MachineId;
        var mm = await c.CreateMmAsync(machine);
        var thread = (await c.CreateThreadAsync(mm)).ThreadId;
        Assert.Equal(Errno.Unspecified, await c.MmapAsync(mm, A, Page, 3));
        var (_, uffd) = await c.CreateUffdAsync(mm);
        await c.ApiAsync(uffd);
        await c.RegisterAsync(uffd, A, Page, mode: 2);
        await c.WriteAsync(thread, A, 0x11);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(uffd, A, Page, mode: 1));

        var write = c.WriteAsync(thread, A, 0x22);
        await foreach (var msg in c.ReadEventsAsync(uffd))
        {
            Assert.True(msg.Pagefault.Wp);
            await c.WriteprotectAsync(uffd, A, Page, mode: 0);
            break;
        }

        Assert.Equal("ok", (await write.WaitAsync(TimeSpan.FromSeconds(30))).Errno.Name());
        Assert.Equal(0x22, (await c.ReadAsync(thread, A)).Values[0]);
        await c.DestroyMachineAsync(machine);
    }
}

public sealed class InProcessFixtureTests(UffdServerFixture server) : IClassFixture<UffdServerFixture>
{
    [Fact]
    public Task A_fault_round_trip_through_the_in_process_server() => FaultRoundTrip.RunAsync(server.Client);

    [Fact]
    public async Task Each_new_client_shares_the_server()
    {
        var machine = (await server.Client.CreateMachineAsync()).MachineId;
        using var other = server.NewClient();

        Assert.Equal(machine, (await other.GetMachineAsync(machine)).MachineId);
    }
}

public sealed class ContainerFixtureTests(UffdContainerFixture container, ITestOutputHelper output) : IClassFixture<UffdContainerFixture>
{
    [SkippableFact]
    public async Task A_fault_round_trip_through_the_server_image()
    {
        if (container.SkipReason is { } why)
            output.WriteLine("skipped: " + why);
        Skip.If(container.SkipReason is not null, container.SkipReason);
        output.WriteLine($"image {UffdContainerFixture.Image} at {container.Address}");

        await FaultRoundTrip.RunAsync(container.Client);
    }
}
