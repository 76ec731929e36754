"""mmskip"""
