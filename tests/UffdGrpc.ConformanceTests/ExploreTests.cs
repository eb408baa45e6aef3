using UffdGrpc.Scenarios;

namespace UffdGrpc.ConformanceTests;

/// <summary>
/// Seeded scheduling and exploration: a seed fixes the interleaving, so a run replays
/// exactly; exploring seeds finds the dirty tracker that collects with PAGEMAP_SCAN and
/// re-protects in a second call losing a write made in between, and finds none for the
/// tracker that does both in one PM_SCAN_WP_MATCHING call.
/// </summary>
public class ExploreTests
{
    [Fact]
    public void Explore_finds_the_two_call_dirty_tracker_losing_a_write_and_its_seed_replays_it()
    {
        var outcomes = Explorer.ExploreDirtyTracking(DirtyHandler.TwoCalls, 1, 100);
        var bad = outcomes.FirstOrDefault(o => o.Breaks);

        Assert.NotNull(bad);
        var seed = bad.Seeds.Min();
        var first = DirtyTrackingWorkload.Run(seed, DirtyHandler.TwoCalls);
        var again = DirtyTrackingWorkload.Run(seed, DirtyHandler.TwoCalls);
        Assert.NotNull(first.LostWrite);
        Assert.Equal(first, again);
        Assert.Contains("re-protect", first.LostWrite, StringComparison.Ordinal);
        // The same seed with the atomic tracker keeps every write.
        Assert.Null(DirtyTrackingWorkload.Run(seed, DirtyHandler.WpMatching).LostWrite);
    }

    [Fact]
    public void The_WP_MATCHING_tracker_reports_every_write_under_every_seed()
    {
        var outcomes = Explorer.ExploreDirtyTracking(DirtyHandler.WpMatching, 1, 100);

        var o = Assert.Single(outcomes);
        Assert.False(o.Breaks);
        Assert.Equal(100, o.Seeds.Count);
    }

    [Fact]
    public void Different_seeds_interleave_the_guest_and_the_tracker_differently()
    {
        var runs = Enumerable.Range(1, 20).Select(s => DirtyTrackingWorkload.Run((ulong)s, DirtyHandler.TwoCalls)).ToList();

        Assert.True(runs.Select(r => r.Summary).Distinct().Count() > 1);
        Assert.All(runs, r => Assert.True(r.Writes > 0 && r.Scans > 0));
    }

    [Fact]
    public async Task A_scenario_under_a_schedule_seed_replays_to_the_same_trace_and_the_default_order_is_unchanged()
    {
        var path = Path.Combine(ScenarioFolders.Project, "p40-dontwake-wake.scn");
        var script = await File.ReadAllTextAsync(path);
        var golden = await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"));

        Assert.Equal(golden, await Explorer.ReplayAsync(script, seed: null));
        for (ulong seed = 1; seed <= 5; seed++)
            Assert.Equal(await Explorer.ReplayAsync(script, seed), await Explorer.ReplayAsync(script, seed));
        var outcomes = await Explorer.ExploreScenarioAsync(script, 1, 10, trace => trace != golden);
        Assert.Equal(10, outcomes.Sum(o => o.Seeds.Count));
    }
}
