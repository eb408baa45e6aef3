using UffdGrpc.Recipes;
using UffdGrpc.Testing;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>
/// Each recipe against the in-process server: the correct handler passes its byte-for-byte
/// check; each wrong handler fails it, found by the same check (the recipes know nothing of
/// which handler runs beyond the handler's own code).
/// </summary>
public sealed class RecipeChecks(UffdServerFixture server, ITestOutputHelper output) : IClassFixture<UffdServerFixture>
{
    private async Task<RecipeResult> RunAsync(Recipe recipe, string? wrong, ulong seed = 1, int pages = 0)
    {
        var log = new StringWriter();
        var options = new RecipeOptions { WrongHandler = wrong, Seed = seed, Pages = pages, Stall = TimeSpan.FromMilliseconds(800) };
        var r = await new RecipeRunner(recipe, new RecipeContext(server.Client, options, TextWriter.Synchronized(log))) { Timeout = TimeSpan.FromSeconds(60) }.RunAsync(CancellationToken.None);
        RecipePrinter.Print(r, options, "test", TextWriter.Synchronized(log));
        output.WriteLine(log.ToString());
        return r;
    }

    [Fact]
    public async Task Postcopy_destination_equals_the_source_at_switch_over()
    {
        var r = await RunAsync(new PostcopyRecipe(), null);
        Assert.True(r.Check.Passed, r.Check.Detail);
        Assert.True(r.Report.Get("pages-zeroed") > 0, "no page of zeros went in with ZEROPAGE");
        Assert.True(r.Report.Get("pages-reread") > 0, "no cached page failed its digest check");
        Assert.Equal(64, r.Report.Get("pages-copied") + r.Report.Get("pages-zeroed"));
    }

    [Fact]
    public async Task Postcopy_wake_without_copy_leaves_the_guest_stalled_and_the_destination_incomplete()
    {
        var r = await RunAsync(new PostcopyRecipe(), "wake-without-copy");
        Assert.False(r.Check.Passed);
        Assert.Contains("the destination guest completed 0 of", r.Check.Detail, StringComparison.Ordinal);
        Assert.Contains("(not present)", r.Check.Detail, StringComparison.Ordinal);
        Assert.Contains(r.Report.Notes, n => n.Contains("no access completed for", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Postcopy_stale_page_is_found_by_the_byte_compare()
    {
        var r = await RunAsync(new PostcopyRecipe(), "stale-page");
        Assert.False(r.Check.Passed);
        Assert.Matches(@"destination vs source at switch-over: \d+ of 64 pages differ; first: page \d+ .*\(present\), found .*\(present\)", r.Check.Detail);
    }

    [Fact]
    public async Task Background_snapshot_equals_memory_at_the_snapshot_instant()
    {
        var r = await RunAsync(new BackgroundSnapshotRecipe(), null);
        Assert.True(r.Check.Passed, r.Check.Detail);
        Assert.True(r.Report.Get("wp-faults") > 0, "the guest never wrote a protected page");
    }

    [Theory]
    [InlineData("unprotect-first")]
    [InlineData("no-unpopulated")]
    public async Task Background_snapshot_wrong_handlers_fail_the_check(string wrong)
    {
        var r = await RunAsync(new BackgroundSnapshotRecipe(), wrong);
        Assert.False(r.Check.Passed);
        Assert.Contains("snapshot vs guest memory at the snapshot instant:", r.Check.Detail, StringComparison.Ordinal);
        Assert.Contains("differ; first: page", r.Check.Detail, StringComparison.Ordinal);
        if (wrong == "no-unpopulated")
            Assert.Contains("(not present), found", r.Check.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Dirty_tracking_with_wp_matching_reports_every_write_under_every_seed_and_two_calls_loses_one_under_some_seed()
    {
        var lost = new List<ulong>();
        for (ulong seed = 1; seed <= 8; seed++)
        {
            var good = await RunAsync(new DirtyTrackingRecipe(), null, seed);
            Assert.True(good.Check.Passed, $"seed {seed}: {good.Check.Detail}");
            Assert.Contains("each of", good.Check.Detail, StringComparison.Ordinal);
            // One dirty rate per collect round, beside the round's page count.
            var rates = Assert.Single(good.Report.Notes, n => n.StartsWith("dirty rate per round", StringComparison.Ordinal));
            Assert.Equal(good.Report.Get("rounds"), (long)rates[(rates.IndexOf("): ", StringComparison.Ordinal) + 3)..].Split(' ').Length);
            var bad = await RunAsync(new DirtyTrackingRecipe(), "two-calls", seed);
            if (!bad.Check.Passed)
            {
                Assert.Contains("LOST WRITE: page", bad.Check.Detail, StringComparison.Ordinal);
                lost.Add(seed);
            }
        }
        output.WriteLine("two-calls lost a write under seeds " + string.Join(',', lost));
        Assert.NotEmpty(lost);
    }

    [Fact]
    public async Task Dirty_tracking_with_soft_dirty_on_the_6_1_profile()
    {
        var log = new StringWriter();
        var options = new RecipeOptions { Seed = 3, Settings = new Dictionary<string, string> { ["tracking"] = "soft-dirty" } };
        var r = await new RecipeRunner(new DirtyTrackingRecipe(), new RecipeContext(server.Client, options, TextWriter.Synchronized(log))).RunAsync(CancellationToken.None);
        RecipePrinter.Print(r, options, "test", log);
        output.WriteLine(log.ToString());
        Assert.True(r.Check.Passed, r.Check.Detail);
        Assert.True(r.Report.Get("pagemap-reads") > 0);
    }
}
