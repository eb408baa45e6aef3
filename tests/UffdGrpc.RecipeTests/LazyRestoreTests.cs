using UffdGrpc.Recipes;
using UffdGrpc.Recipes.LazyRestore;
using UffdGrpc.Testing;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>CRIU's lazy restore: the criu/uffd.c daemon restores a forking, remapping, unmapping tree byte for byte; a daemon that ignores REMAP does not.</summary>
public sealed class LazyRestoreTests(UffdServerFixture server, ITestOutputHelper output) : IClassFixture<UffdServerFixture>
{
    private async Task<RecipeResult> RunAsync(string? wrong = null)
    {
        var o = new RecipeOptions { WrongHandler = wrong };
        var writer = new StringWriter();
        var r = await new RecipeRunner(new LazyRestoreRecipe(), new RecipeContext(server.Client, o, writer)).RunAsync(CancellationToken.None);
        RecipePrinter.Print(r, o, "roles in one process", writer);
        output.WriteLine(writer.ToString());
        return r;
    }

    [Fact]
    public async Task CriuDaemonRestoresTheTreeByteForByte()
    {
        // Arrange / Act
        var r = await RunAsync();

        // Assert
        Assert.True(r.Check.Passed, r.Check.ToString());
        Assert.Equal(2, r.Report.Get("fork-events"));
        Assert.Equal(1, r.Report.Get("remap-events"));
        Assert.True(r.Report.Get("unmap-events") >= 1 && r.Report.Get("remove-events") >= 1);
        // The first child exited with pages still lazy: the daemon's fills gave ESRCH.
        Assert.Equal(1, r.Report.Get("tasks-retired-esrch"));
    }

    [Fact]
    public async Task DaemonIgnoringRemapLeavesZerosAtTheNewAddressAndTheCheckCatchesIt()
    {
        var r = await RunAsync(wrong: "ignores-remap");

        Assert.False(r.Check.Passed);
        Assert.Contains(" 80000000-80040000 ", r.Check.Detail, StringComparison.Ordinal);
    }
}
