using UffdGrpc.Recipes.SnapshotRestore;
using UffdGrpc.Testing;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>Firecracker's snapshot restore: the drained handler (and its unregistering variant) restores the guest byte for byte; the in-order handler does not.</summary>
public sealed class SnapshotRestoreTests(UffdServerFixture server, ITestOutputHelper output) : IClassFixture<UffdServerFixture>
{
    [Theory]
    [InlineData(SnapshotHandlerKind.Firecracker)]
    [InlineData(SnapshotHandlerKind.Unregister)]
    public async Task CorrectHandlerRestoresTheGuestByteForByte(SnapshotHandlerKind kind)
    {
        // Arrange / Act
        var r = await SnapshotRestoreRecipe.RunAsync(server.Client, new SnapshotRestoreOptions { Handler = kind });
        output.WriteLine(r.Check.ToString());

        // Assert
        Assert.True(r.Check.Passed, r.Check.ToString());
        Assert.True(r.Stats.Removes >= 2, "both balloon inflations reached the handler");
    }

    [Fact]
    public async Task InOrderHandlerServesARemovedPageFromTheSnapshotAndTheCheckCatchesIt()
    {
        var r = await SnapshotRestoreRecipe.RunAsync(server.Client, new SnapshotRestoreOptions { Handler = SnapshotHandlerKind.InOrder });
        output.WriteLine(r.Check.ToString());

        Assert.False(r.Check.Passed);
        // The page vCPU 0 faulted on before the balloon released its range.
        var b1 = SnapshotRestoreRecipe.GuestBase + 256 / 4 * 4096UL;
        Assert.All(r.Check.Mismatches, a => Assert.InRange(a, b1, b1 + 16 * 4096UL - 1));
    }
}
