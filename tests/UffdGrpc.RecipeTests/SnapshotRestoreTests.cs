using UffdGrpc.Recipes;
using UffdGrpc.Recipes.SnapshotRestore;
using UffdGrpc.Testing;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>Firecracker's snapshot restore: the drained handler and its variants restore the guest byte for byte; the in-order handler does not.</summary>
public sealed class SnapshotRestoreTests(UffdServerFixture server, ITestOutputHelper output) : IClassFixture<UffdServerFixture>
{
    private async Task<RecipeResult> RunAsync(string? wrong = null, string variant = "plain")
    {
        var o = new RecipeOptions { WrongHandler = wrong, Settings = new Dictionary<string, string> { ["variant"] = variant } };
        var writer = new StringWriter();
        var r = await new RecipeRunner(new SnapshotRestoreRecipe(), new RecipeContext(server.Client, o, writer)).RunAsync(CancellationToken.None);
        RecipePrinter.Print(r, o, "roles in one process", writer);
        output.WriteLine(writer.ToString());
        return r;
    }

    [Theory]
    [InlineData("plain")]
    [InlineData("unregister")]
    public async Task DrainedHandlerRestoresTheGuestByteForByte(string variant)
    {
        // Arrange / Act
        var r = await RunAsync(variant: variant);

        // Assert
        Assert.True(r.Check.Passed, r.Check.ToString());
        Assert.Equal(2, r.Report.Get("remove-events"));
        if (variant == "unregister")
            Assert.True(r.Report.Get("unregisters") > 2 && r.Report.Get("pages-copied") < 256 * 3 / 4, "known-zero and removed ranges are the kernel's");
        else
            Assert.True(r.Report.Get("zeropages") > 0, "removed pages are answered with ZEROPAGE");
    }

    [Fact]
    public async Task InOrderHandlerServesARemovedPageFromTheSnapshotAndTheCheckCatchesIt()
    {
        var r = await RunAsync(wrong: "in-order");

        Assert.False(r.Check.Passed);
        // The first differing page is the one vCPU 0 faulted on before the balloon released its range (pages 64..79).
        Assert.Contains("first: page 64 ", r.Check.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task MinorClonesShareTheSnapshotsFramesAndMatchByteForByte()
    {
        var r = await RunAsync(variant: "minor-clones");

        Assert.True(r.Check.Passed, r.Check.ToString());
        var minor = r.Report.Get("minor-clones-distinct-frames");
        var copy = r.Report.Get("copy-clones-distinct-frames");
        // Three COPY clones hold 3 × 128 private frames; the MINOR clones share the memfd's 128 and add a frame per page they wrote.
        Assert.Equal(3 * 128, copy);
        Assert.InRange(minor, 128, 2 * 128);
    }
}
