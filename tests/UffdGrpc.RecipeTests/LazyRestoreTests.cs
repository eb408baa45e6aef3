using UffdGrpc.Recipes.LazyRestore;
using UffdGrpc.Testing;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>CRIU's lazy restore: the criu/uffd.c daemon restores a forking, remapping, unmapping tree byte for byte; a daemon that ignores REMAP does not.</summary>
public sealed class LazyRestoreTests(UffdServerFixture server, ITestOutputHelper output) : IClassFixture<UffdServerFixture>
{
    [Fact]
    public async Task CriuDaemonRestoresTheTreeByteForByte()
    {
        // Arrange / Act
        var r = await LazyRestoreRecipe.RunAsync(server.Client, new LazyRestoreOptions());
        foreach (var c in r.Checks)
            output.WriteLine(c.ToString());
        var s = r.Stats;
        output.WriteLine($"faults {s.Faults} copies {s.FaultCopies} zero {s.Zeropages} pushes {s.Pushes} pushed {s.PushedPages} forks {s.Forks} remaps {s.Remaps} unmaps {s.Unmaps} removes {s.Removes} retired {s.Retired} eagain {s.Eagain} max chunk {s.MaxChunk}");

        // Assert
        Assert.True(r.Passed, string.Join("; ", r.Checks));
        Assert.Equal(3, r.Checks.Count);
        Assert.Equal(2, s.Forks);
        Assert.Equal(1, s.Remaps);
        Assert.True(s.Unmaps >= 1 && s.Removes >= 1);
        // The first child exited with pages still lazy: its fills gave ESRCH.
        Assert.Equal(1, s.Retired);
    }

    [Fact]
    public async Task DaemonIgnoringRemapLeavesZerosAtTheNewAddressAndTheCheckCatchesIt()
    {
        var r = await LazyRestoreRecipe.RunAsync(server.Client, new LazyRestoreOptions { Daemon = LazyDaemonKind.IgnoresRemap });
        foreach (var c in r.Checks)
            output.WriteLine(c.ToString());

        Assert.False(r.Passed);
        // Only the moved region differs (in P, and in the child that inherited it).
        Assert.All(r.Checks.SelectMany(c => c.Mismatches), a => Assert.InRange(a, LazyRestoreRecipe.RegionD, LazyRestoreRecipe.RegionD + 64 * 4096 - 1));
    }
}
