namespace UffdGrpc.Recipes;

/// <summary>Every recipe the CLI offers (<c>uffdgrpc recipe NAME</c>), in the order it lists them.</summary>
public static class RecipeCatalog
{
    public static IReadOnlyList<Recipe> All { get; } =
    [
        new PostcopyRecipe(),
        new BackgroundSnapshotRecipe(),
        new DirtyTrackingRecipe(),
        new SnapshotRestore.SnapshotRestoreRecipe(),
        new LazyRestore.LazyRestoreRecipe(),
    ];

    /// <summary>The recipe named <paramref name="name"/>, or null.</summary>
    public static Recipe? Find(string name) => All.FirstOrDefault(r => r.Name == name);
}
