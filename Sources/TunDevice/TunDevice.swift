import NetBase
