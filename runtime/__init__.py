"""Process settings both stages share: device choice, memory policy, versions, progress bars.

A leaf package: it imports nothing of fsar, so pipeline/, store/ and heads/ may all use it.
"""
