"""ZooKeeper: the keeper, its mirrors, the elected publisher and the builder that joins them.

kazoo is imported here and nowhere else in the package.
"""
